"""The 438 HHH pairwise comparisons of the Constitutional AI paper (Bai et al., 2022, ``evals/438HHHEvaluations.jsonl``).

Each line is ``{"prompt": "... Options:\\n (A) [[[...]]]\\n (B) [[[...]]]\\n\\nThe answer is:", "corrects": [" (B)"],
"incorrects": [" (A)"], ...}``: one better and one worse reply, shown as lettered options, the answer string being
the option letter in parentheses.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmcycle.data.records import read_records
from lmcycle.errors import LmcycleError

HHH_FILE = "438HHHEvaluations.jsonl"
_ANSWER = re.compile(r"\s*\(([A-Z])\)\s*")


def _answer(row: dict, key: str, file: Path, line: int) -> str:
    value = row.get(key)
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], str)
            and _ANSWER.fullmatch(value[0])):
        raise LmcycleError("must be a list of exactly one option letter such as [\" (A)\"]", file=file, line=line,
                           field=key)
    return value[0]


def load_hhh(path: str | Path) -> list[dict]:
    """The comparisons of ``path`` (the jsonl file, or a folder holding it directly or under ``evals/``) as
    ``{"id", "prompt", "correct", "incorrect", "gold"}``: ``id`` is the 1-based line, ``correct``/``incorrect``
    the answer strings as written (``" (B)"``), ``gold`` the correct option letter (``"B"``). Blank lines are
    skipped; a malformed line raises :class:`LmcycleError` naming the file, line and field."""
    file = Path(path)
    if file.is_dir():
        file = next((f for f in (file / HHH_FILE, file / "evals" / HHH_FILE) if f.exists()), file / HHH_FILE)
    items = []
    for rec in read_records(file, "jsonl"):
        row, number = rec.data, rec.line
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise LmcycleError("must be a non-empty string", file=file, line=number, field="prompt")
        correct, incorrect = (_answer(row, key, file, number) for key in ("corrects", "incorrects"))
        gold = answer_letter(correct)
        if answer_letter(incorrect) == gold:
            raise LmcycleError(f"names the same option ({gold}) as 'corrects'", file=file, line=number,
                               field="incorrects")
        items.append({"id": number, "prompt": row["prompt"], "correct": correct, "incorrect": incorrect,
                      "gold": gold})
    return items


def answer_letter(answer: str) -> str:
    """The option letter of an answer string: ``" (B)"`` -> ``"B"``."""
    return _ANSWER.fullmatch(answer).group(1)
