"""SQuAD v1.1 exact match and token F1 on hand-made answers, with expected values worked out here."""

from __future__ import annotations

import pytest

from lmcycle.errors import LmcycleError
from lmcycle.evals.squad import exact_match, normalize_answer, token_f1


def test_normalisation_follows_the_official_rules():
    # Lowercase, punctuation and the article removed: the two are the same answer.
    assert normalize_answer("The Eiffel Tower!") == normalize_answer("eiffel tower") == "eiffel tower"
    # Articles go only as whole words; "anthem" keeps its "an".
    assert normalize_answer("An anthem, a theme") == "anthem theme"
    assert normalize_answer("  U.S.   Army ") == "us army"


def test_exact_match_and_f1_take_the_best_gold_answer():
    predictions = ["The Eiffel Tower!", "in Paris, France", "1902", "nothing relevant"]
    references = [["eiffel tower"], ["Lyon", "Paris"], ["in 1902", "1903"], ["Paris"]]
    em, f1 = exact_match(predictions, references), token_f1(predictions, references)
    # Example 2: best gold "Paris": 1 shared token, precision 1/3, recall 1 -> F1 = 2*(1/3)/(4/3) = 0.5.
    # Example 3: "1902" vs "in 1902": precision 1, recall 1/2 -> F1 = 2/3; EM 0.
    assert [e["exact_match"] for e in em.per_example] == [100.0, 0.0, 0.0, 0.0]
    assert [e["token_f1"] for e in f1.per_example] == pytest.approx([100.0, 50.0, 200 / 3, 0.0])
    assert em.values["exact_match"] == pytest.approx(25.0)
    assert f1.values["token_f1"] == pytest.approx((100 + 50 + 200 / 3) / 4)
    assert "articles" in em.settings["normalisation"] and em.settings["multi_ref"].startswith("max")


def test_repeated_tokens_count_as_bags():
    # "paris paris" vs "paris": 1 shared token, precision 1/2, recall 1 -> F1 = 2/3.
    assert token_f1(["paris paris"], [["paris"]]).values["token_f1"] == pytest.approx(200 / 3)
    assert token_f1([""], [["paris"]]).values["token_f1"] == 0.0


def test_bad_inputs():
    with pytest.raises(LmcycleError, match="2 predictions but 1"):
        exact_match(["a", "b"], [["a"]])
    with pytest.raises(LmcycleError, match="non-empty list"):
        token_f1(["a"], [[]])
