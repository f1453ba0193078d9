"""Accuracy and macro-F1 of generated label words, against hand computation and (if present) sklearn."""

from __future__ import annotations

import pytest

from lmcycle.errors import LmcycleError
from lmcycle.evals.classification import accuracy, macro_f1, predicted_label

PREDICTIONS = ["Offensive.", "neither", "hate, because it targets a group", "I think hate", ""]
GOLD = ["offensive", "hate", "hate", "hate", "neither"]
REFERENCES = [[g] for g in GOLD]


def test_prediction_is_read_by_its_first_words():
    labels = ["hate", "hate speech", "neither", "offensive"]
    assert predicted_label("Offensive!", labels) == "offensive"
    assert predicted_label("hate speech, clearly", labels) == "hate speech"  # the longest label that fits
    assert predicted_label("hateful", labels) is None  # whole words only
    assert predicted_label("it is neither", labels) is None  # the label must come first


def test_accuracy_by_hand():
    score = accuracy(PREDICTIONS, REFERENCES)
    # Read as: offensive (right), neither (wrong), hate (right), no label, no label -> 2 of 5.
    assert [e["accuracy"] for e in score.per_example] == [100.0, 0.0, 100.0, 0.0, 0.0]
    assert score.values["accuracy"] == pytest.approx(40.0)
    assert score.settings["labels"] == ["hate", "neither", "offensive"]
    assert score.settings["predictions_without_label"] == 2


def test_macro_f1_by_hand():
    score = macro_f1(PREDICTIONS, REFERENCES)
    # hate: TP 1, predicted 1, gold 3 -> P 1, R 1/3 -> F1 0.5.  neither: TP 0 -> 0.  offensive: P = R = 1 -> 1.
    assert score.values["f1_hate"] == pytest.approx(50.0)
    assert score.values["f1_neither"] == 0.0 and score.values["f1_offensive"] == pytest.approx(100.0)
    assert score.values["macro_f1"] == pytest.approx(50.0)
    assert score.per_example == []


def test_macro_f1_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics", reason="sklearn is not installed; checked by hand above")
    predictions = ["hate", "hate", "neither", "offensive", "offensive", "neither x", "junk", "Neither", "hate"]
    gold = ["hate", "neither", "neither", "offensive", "hate", "neither", "offensive", "offensive", "hate"]
    read = [predicted_label(p, sorted(set(gold))) or "<none>" for p in predictions]
    expected = 100 * metrics.f1_score(gold, read, labels=sorted(set(gold)), average="macro", zero_division=0)
    assert macro_f1(predictions, [[g] for g in gold]).values["macro_f1"] == pytest.approx(expected)
    assert accuracy(predictions, [[g] for g in gold]).values["accuracy"] == pytest.approx(
        100 * metrics.accuracy_score(gold, read))


def test_bad_inputs():
    with pytest.raises(LmcycleError, match="predictions but"):
        accuracy(["a"], [])
    with pytest.raises(LmcycleError, match="gold label"):
        macro_f1(["a"], [["!!"]])
