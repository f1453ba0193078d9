"""DialogSum (Chen et al., 2021) from its directory of JSON Lines files.

Layout (as in /work/shared/data/dialogsum): ``dialogsum.train.jsonl.gz`` (or ``.jsonl``), ``dialogsum.dev.jsonl``,
``dialogsum.test.jsonl``. Train and dev records have ``fname, dialogue, summary, topic``; test records have three
reference summaries and topics (``summary1..3``, ``topic1..3``), which all become targets for multi-reference
scoring. Dialogue turns are ``#Person1#: ...`` lines separated by ``\\n``.
"""

from __future__ import annotations

from pathlib import Path

from lmcycle.data.examples import Example
from lmcycle.data.records import SourceRecord, read_records, text_field
from lmcycle.errors import LmcycleError

SPLIT_NAMES = {"train": "train", "dev": "dev", "validation": "dev", "test": "test"}


def load_dialogsum(directory: str | Path, split: str) -> list[Example]:
    """The examples of one split (``train``, ``dev``/``validation`` or ``test``), task ``dialogsum``.

    ``id`` is the record's ``fname``; ``meta`` has ``topic`` (the first) and ``topics`` (all of them).
    """
    directory = Path(directory)
    if split not in SPLIT_NAMES:
        raise LmcycleError(f"unknown DialogSum split '{split}' (known: {', '.join(SPLIT_NAMES)})", field="split")
    if not directory.is_dir():
        raise LmcycleError("DialogSum directory not found", file=directory)
    stem = f"dialogsum.{SPLIT_NAMES[split]}"
    candidates = [directory / f"{stem}.jsonl", directory / f"{stem}.jsonl.gz"]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise LmcycleError(f"DialogSum directory has no {split} split (looked for {stem}.jsonl and "
                           f"{stem}.jsonl.gz)", file=directory)
    return [_to_example(rec) for rec in read_records(file, "jsonl")]


def _to_example(rec: SourceRecord) -> Example:
    # Test records number their references (summary1..3); train/dev have one, unnumbered.
    numbered = "summary1" in rec.data
    if numbered:
        n = sum(1 for k in rec.data if k.startswith("summary"))
        targets = [text_field(rec, f"summary{i}") for i in range(1, n + 1)]
        topics = [rec.data.get(f"topic{i}", "") for i in range(1, n + 1)]
    else:
        targets = [text_field(rec, "summary")]
        topics = [rec.data.get("topic", "")]
    return Example(input=text_field(rec, "dialogue"), targets=targets, task="dialogsum",
                   id=text_field(rec, "fname"), meta={"topic": topics[0], "topics": topics})
