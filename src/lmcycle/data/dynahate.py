"""DynaHate (Vidgen et al., 2021): adversarially written hate / not-hate texts, as a 2-way task.

The shared copy has two of the official splits as CSVs (from the MaRCo repository; the train split is missing):

=============  =======  ======  =======  =====
split          file     hate    nothate  total
=============  =======  ======  =======  =====
dev            db_dev   1,858   1,648    3,506
test           db_test  2,011   1,560    3,571
=============  =======  ======  =======  =====

Columns used: ``text``, ``label`` (``hate`` / ``nothate``) and ``acl.id`` (unique). Examples keep file order;
targets are the label word; ``meta`` has ``round`` (``round.base``, 1-4), ``type`` and ``target`` (the targeted
group) when present. The texts are hateful by design: never print them in tests or logs.
"""

from __future__ import annotations

from pathlib import Path

from lmcycle.data.examples import Example
from lmcycle.data.records import SourceRecord, read_records, text_field
from lmcycle.errors import LmcycleError

LABELS = ("hate", "nothate")
SPLIT_FILES = {"dev": "db_dev.csv", "validation": "db_dev.csv", "test": "db_test.csv"}
META_FIELDS = {"round.base": "round", "type": "type", "target": "target"}


def load_dynahate(path: str | Path, split: str) -> list[Example]:
    """The examples of one split (``dev``/``validation`` or ``test``), task ``dynahate``, in file order.

    ``path`` is the directory holding ``db_dev.csv`` and ``db_test.csv``, or one of those files itself (then
    ``split`` is not used). ``id`` is the record's ``acl.id``.
    """
    if split not in SPLIT_FILES:
        raise LmcycleError(f"unknown DynaHate split '{split}' (known: {', '.join(SPLIT_FILES)})", field="split")
    path = Path(path)
    file = path / SPLIT_FILES[split] if path.is_dir() else path
    if not file.is_file():
        raise LmcycleError(f"DynaHate data not found (expected {SPLIT_FILES[split]} or a path to it)", file=file)
    examples, seen = [], {}
    for rec in read_records(file, "csv"):
        ex = _to_example(rec)
        if ex.id in seen:
            raise LmcycleError(f"duplicate id '{ex.id}' (first on line {seen[ex.id]})", file=rec.file, line=rec.line,
                               field="acl.id")
        seen[ex.id] = rec.line
        examples.append(ex)
    return examples


def _to_example(rec: SourceRecord) -> Example:
    label = text_field(rec, "label").strip()
    if label not in LABELS:
        raise LmcycleError(f"unknown label {label!r:.30} (known: {', '.join(LABELS)})", file=rec.file, line=rec.line,
                           field="label")
    text = " ".join(text_field(rec, "text").split())
    ex_id = text_field(rec, "acl.id").strip()
    meta = {name: rec.data[column] for column, name in META_FIELDS.items() if column in rec.data}
    return Example(input=text, targets=[label], task="dynahate", id=ex_id, meta={"label": label, **meta})
