"""GSM8K (Cobbe et al., 2021) grade-school math word problems, from its directory of JSON Lines files.

Layout (as in /work/shared/data/gsm8k): ``train.jsonl`` (7,473 problems) and ``test.first500.jsonl`` (the first
500 of the 1,319 test problems; the rest are held out). Each record is ``{"question", "answer"}`` where
``answer`` is a worked solution with calculator annotations ``<<48/2=24>>`` and ends in ``#### <final answer>``.

The training target is that solution with the annotations removed (``keep_calculator=True`` keeps them) and
blank lines collapsed (4 training solutions hold one, and ``"\\n\\n"`` is the default stop string), so it still
ends in ``#### <answer>``. ``meta["answer"]`` is the final answer as written (e.g. ``"1,080"``);
:func:`lmcycle.evals.gsm8k.gsm8k_accuracy` reads the gold number from the target's ``####`` line.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmcycle.data.examples import Example
from lmcycle.data.records import SourceRecord, read_records, text_field
from lmcycle.errors import LmcycleError

SPLIT_FILES = {"train": "train.jsonl", "test": "test.first500.jsonl"}
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_BLANK_LINES = re.compile(r"\n\s*\n")


def load_gsm8k(path: str | Path, split: str, keep_calculator: bool = False) -> list[Example]:
    """The examples of one split (``train`` or ``test``), task ``gsm8k``, in file order.

    ``path`` is the GSM8K directory or one of its JSON Lines files. ``id`` is ``<file>:<line>``.
    """
    file = _split_file(Path(path), split)
    return [_to_example(rec, keep_calculator) for rec in read_records(file, "jsonl")]


def strip_calculator(solution: str) -> str:
    """``solution`` without its ``<<expression=value>>`` calculator annotations."""
    return _CALCULATOR.sub("", solution)


def _split_file(path: Path, split: str) -> Path:
    if split not in SPLIT_FILES:
        raise LmcycleError(f"unknown GSM8K split '{split}' (known: {', '.join(SPLIT_FILES)})", field="split")
    if path.is_file():
        return path
    if not path.is_dir():
        raise LmcycleError("GSM8K directory or file not found", file=path)
    file = path / SPLIT_FILES[split]
    if not file.is_file():
        raise LmcycleError(f"GSM8K directory has no {split} split (looked for {SPLIT_FILES[split]})", file=path)
    return file


def _to_example(rec: SourceRecord, keep_calculator: bool) -> Example:
    question = text_field(rec, "question")
    solution = text_field(rec, "answer")
    if "####" not in solution:
        raise LmcycleError("solution has no final answer after '####'", file=rec.file, line=rec.line, field="answer")
    answer = solution.rsplit("####", 1)[1].strip()
    if not answer:
        raise LmcycleError("empty final answer after '####'", file=rec.file, line=rec.line, field="answer")
    target = solution if keep_calculator else strip_calculator(solution)
    target = _BLANK_LINES.sub("\n", target).strip()
    return Example(input=question, targets=[target], task="gsm8k", id=f"{Path(rec.file).name}:{rec.line}",
                   meta={"answer": answer})
