"""Red-team prompts for Constitutional AI, as recipe examples: the paper's sample prompts and the opening human
turns of HH-RLHF's harmless-base (collected by red-teaming).

Each example's input is the conversation up to the assistant's turn, ``"\\n\\nHuman: ...\\n\\nAssistant:"``, the
form the paper's prompts take (:func:`lmcycle.align.constitution.conversation` keeps it); its one target is
empty (red-team prompts have no reference answer). Never print these texts: they are harmful requests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from lmcycle.data.examples import Example
from lmcycle.data.preferences import (
    ASSISTANT_TAG,
    PREFERENCE_SPLITS,
    PREFERENCE_TEST_FRACTION,
    _preference_file,
    load_hh_rlhf,
)
from lmcycle.data.records import read_records
from lmcycle.errors import LmcycleError

HUMAN_TAG = "\n\nHuman:"


def _example(prompt: str, prefix: str, **meta) -> Example:
    return Example(input=prompt, targets=[""], task="red_team",
                   id=f"{prefix}-" + hashlib.sha1(prompt.encode()).hexdigest()[:16], meta=meta)


def load_cai_prompts(path: str | Path) -> list[Example]:
    """The distinct ``rl_prompt`` of the paper's ``samples/*.jsonl`` (66: 40 PALMS, 13 LaMDA, 13 InstructGPT), in
    file-name then line order; ``path`` is the ``constitutional_ai`` folder or its ``samples/``. ``meta`` holds
    the prompt's ``comparison_dataset``."""
    path = Path(path)
    folder = path / "samples" if (path / "samples").is_dir() else path
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise LmcycleError("no samples/*.jsonl here (the paper's constitutional_ai folder)", file=str(path),
                           field="path")
    seen: dict[str, Example] = {}
    for file in files:
        for rec in read_records(file, "jsonl"):
            row, line_no = rec.data, rec.line
            prompt = row.get("rl_prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or ASSISTANT_TAG not in prompt:
                raise LmcycleError("expected a conversation ending in '\\n\\nAssistant:'", file=str(file),
                                   line=line_no, field="rl_prompt")
            if prompt not in seen:
                seen[prompt] = _example(prompt, "cai", dataset=row.get("comparison_dataset", file.stem))
    return list(seen.values())


def load_hh_red_team(path: str | Path, split: str) -> list[Example]:
    """The distinct opening human turns of an HH-RLHF file, each as a one-turn conversation, in file order;
    ``split`` ``train``/``test``/``all`` by the turn itself (a fixed hash puts 15% of the turns in test), so no
    opening turn is on both sides."""
    if split not in PREFERENCE_SPLITS:
        raise LmcycleError(f"unknown split '{split}' (known: {', '.join(PREFERENCE_SPLITS)})", field="split")
    seen: dict[str, Example] = {}
    for pair in load_hh_rlhf(_preference_file(Path(path))):
        start = pair.prompt.find(HUMAN_TAG)
        end = pair.prompt.find(ASSISTANT_TAG, start)
        turn = pair.prompt[start + len(HUMAN_TAG): end].strip() if start >= 0 and end > start else ""
        if turn:
            prompt = f"{HUMAN_TAG} {turn}{ASSISTANT_TAG}"
            seen.setdefault(prompt, _example(prompt, "hhrt"))
    if split == "all":
        return list(seen.values())
    # the example id is a hash of the prompt: its first 8 hex digits as a fraction place it
    in_test = [int(e.id.split("-")[1][:8], 16) / 16**8 < PREFERENCE_TEST_FRACTION for e in seen.values()]
    return [e for e, t in zip(seen.values(), in_test, strict=True) if t == (split == "test")]
