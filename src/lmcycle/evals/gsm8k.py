"""GSM8K answer accuracy: the number a model ends on, compared numerically with the gold final answer.

The predicted number (:func:`extract_answer`) is the first number after the first ``####`` in the prediction,
else the last number anywhere in it. The gold number is read the same way from the reference (the solution
ends in ``#### <answer>``; a bare number also works). Numbers are ``-?digits`` with optional thousands commas
and decimals; commas are removed and the values compared as decimals, so ``1,080`` = ``1080`` = ``1080.00``.
"""

from __future__ import annotations

import re
from decimal import Decimal

from lmcycle import __version__
from lmcycle.errors import LmcycleError
from lmcycle.evals.score import Score, Signature

EXTRACTION = ("the first number after the first '####', else the last number in the text; a number is "
              "-?digits with optional thousands commas and decimals; commas stripped")
SIGNATURE = Signature.of("gsm8k_accuracy", __version__, extract="hash-else-last", gold="first-ref",
                         cmp="decimal")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> Decimal | None:
    """The answer number in ``text`` (see :data:`EXTRACTION`), or None when it holds no number."""
    if "####" in text:
        found = _NUMBER.search(text.split("####", 1)[1])
        if found:
            return _to_decimal(found.group())
    numbers = _NUMBER.findall(text)
    return _to_decimal(numbers[-1]) if numbers else None


def gsm8k_accuracy(predictions: list[str], references: list[list[str]]) -> Score:
    """Percentage (x100) of predictions whose answer number equals the gold one (``references[i][0]``).

    ``per_example[i]["gsm8k_accuracy"]`` is 100.0 or 0.0; a prediction with no number is wrong.
    """
    if len(predictions) != len(references):
        raise LmcycleError(f"{len(predictions)} predictions but {len(references)} reference lists")
    per_example = []
    no_number = 0
    for i, (pred, refs) in enumerate(zip(predictions, references, strict=True)):
        gold = extract_answer(refs[0]) if refs and not isinstance(refs, str) else None
        if gold is None:
            raise LmcycleError(f"example {i}: the reference has no final answer number")
        answer = extract_answer(pred)
        no_number += answer is None
        per_example.append({"gsm8k_accuracy": 100.0 if answer == gold else 0.0})
    n = len(per_example)
    settings = {
        "extraction": EXTRACTION,
        "gold": "the same extraction applied to the first reference (the solution's '#### <answer>')",
        "comparison": "numeric (decimal) equality",
        "predictions_without_number": no_number,
        "aggregation": "mean over examples, x100",
        "n": n,
    }
    return Score(values={"gsm8k_accuracy": sum(e["gsm8k_accuracy"] for e in per_example) / n if n else 0.0},
                 settings=settings, per_example=per_example, signature=SIGNATURE)


def _to_decimal(number: str) -> Decimal:
    return Decimal(number.replace(",", ""))  # always valid: the regex leaves -?digits(.digits)? once commas go
