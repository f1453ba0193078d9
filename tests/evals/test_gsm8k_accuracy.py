"""GSM8K answer extraction and accuracy on hand-written solutions."""

from __future__ import annotations

from decimal import Decimal

import pytest

from lmcycle.errors import LmcycleError
from lmcycle.evals.gsm8k import extract_answer, gsm8k_accuracy


@pytest.mark.parametrize("text, expected", [
    ("5 + 3 = 8 apples.\n#### 8", "8"),
    ("#### 12 then later 15", "12"),  # the number after '####' wins over the last one
    ("The answer is 1,080.", "1080"),  # no '####': the last number, commas stripped, the full stop is not a decimal
    ("She pays $-3.50 in total", "-3.5"),
    ("#### none, but 7 earlier?", "7"),  # nothing after '####' is a number: fall back to the last number
    ("no digits at all", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == (Decimal(expected) if expected is not None else None)


def test_accuracy_compares_numbers():
    references = [["2 + 2 = 4\n#### 4"], ["#### 1,080"], ["#### 18"], ["#### 7"]]
    predictions = ["I think it is 4", "#### 1080", "The total is 18.00 dollars", "#### 8\nor maybe 7"]
    score = gsm8k_accuracy(predictions, references)
    # 4 = 4; 1080 = 1,080; 18.00 = 18; the '####' answer 8 is not 7.
    assert [e["gsm8k_accuracy"] for e in score.per_example] == [100.0, 100.0, 100.0, 0.0]
    assert score.values["gsm8k_accuracy"] == pytest.approx(75.0)
    assert "####" in score.settings["extraction"] and score.settings["predictions_without_number"] == 0


def test_reference_without_number_is_an_error():
    with pytest.raises(LmcycleError, match="example 1"):
        gsm8k_accuracy(["1", "2"], [["#### 1"], ["no answer"]])
