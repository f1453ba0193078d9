"""Classification by generation: accuracy and macro-F1 of a generated label against the gold label word.

A generated text is read as a label by :func:`predicted_label`: both texts are normalised (lowercase, every
non-alphanumeric character a space, whitespace collapsed), and the prediction names the label whose normalised
words are the prediction's first word(s) ("Offensive." and "offensive, because ..." both read as
``offensive``). When several labels fit, the longest wins; when none does, the prediction names no label and
counts as wrong. The label set is the distinct gold labels (``references[i][0]``), so a model answering with a
word outside it is never right.

:func:`score_labels` gives both scores of a classifier's predicted class names against the gold class names.
"""

from __future__ import annotations

import re
from typing import Any

from lmcycle import __version__
from lmcycle.errors import LmcycleError
from lmcycle.evals.score import Score, Signature

NORMALISATION = "lowercase; every non-alphanumeric character becomes a space; whitespace collapsed"
READING_RULE = ("the prediction names the gold label whose normalised words are its first word(s) (longest such "
                "label if several); otherwise no label, which counts as wrong")
_NOT_ALNUM = re.compile(r"[^0-9a-z]+")


def normalise_label(text: str) -> str:
    """``text`` lowercased, with non-alphanumeric characters as spaces and whitespace collapsed."""
    return " ".join(_NOT_ALNUM.sub(" ", text.lower()).split())


def predicted_label(prediction: str, labels: list[str]) -> str | None:
    """The normalised label ``prediction`` starts with (whole words; the longest if several), else None.

    ``labels`` must already be normalised (:func:`normalise_label`).
    """
    words = normalise_label(prediction)
    fitting = [label for label in labels if words == label or words.startswith(label + " ")]
    return max(fitting, key=len) if fitting else None


def accuracy(predictions: list[str], references: list[list[str]]) -> Score:
    """Percentage (x100) of predictions that read as their gold label ``references[i][0]``.

    ``per_example[i]["accuracy"]`` is 100.0 or 0.0.
    """
    gold, read = _read_labels(predictions, references)
    per_example = [{"accuracy": 100.0 if p == g else 0.0} for p, g in zip(read, gold, strict=True)]
    values = {"accuracy": sum(e["accuracy"] for e in per_example) / len(per_example) if per_example else 0.0}
    return Score(values=values, settings=_settings(gold, read), per_example=per_example,
                 signature=_signature("accuracy", gold))


def macro_f1(predictions: list[str], references: list[list[str]]) -> Score:
    """Macro-averaged F1 (x100) over the gold label set, plus each label's F1 as ``f1_<label>``.

    Per label: precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R), and 0 where a ratio
    is 0/0 (sklearn's ``f1_score(average="macro", labels=<gold labels>, zero_division=0)``). A prediction that
    names no label is a false negative for its gold label and a false positive for none. F1 is not a mean over
    examples, so ``per_example`` is empty.
    """
    gold, read = _read_labels(predictions, references)
    labels = sorted(set(gold))
    per_label = {}
    for label in labels:
        tp = sum(1 for p, g in zip(read, gold, strict=True) if p == g == label)
        n_predicted = sum(1 for p in read if p == label)
        n_gold = sum(1 for g in gold if g == label)
        per_label[label] = 200.0 * tp / (n_predicted + n_gold) if tp else 0.0  # 2PR/(P+R) = 2TP/(pred+gold)
    values = {"macro_f1": sum(per_label.values()) / len(labels) if labels else 0.0}
    values.update({f"f1_{label.replace(' ', '_')}": f1 for label, f1 in per_label.items()})
    settings = _settings(gold, read) | {
        "averaging": "unweighted mean over the gold labels of per-label F1; 0 where precision or recall is 0/0 "
                     "(= sklearn f1_score(average='macro', labels=gold labels, zero_division=0))",
    }
    return Score(values=values, settings=settings, per_example=[],
                 signature=_signature("macro_f1", gold, avg="macro", zero_div=0))


def _read_labels(predictions: list[str], references: list[list[str]]) -> tuple[list[str], list[str | None]]:
    if len(predictions) != len(references):
        raise LmcycleError(f"{len(predictions)} predictions but {len(references)} reference lists")
    gold = []
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs or not normalise_label(refs[0]):
            raise LmcycleError(f"example {i}: the gold label must be a non-empty first reference")
        gold.append(normalise_label(refs[0]))
    labels = sorted(set(gold))
    return gold, [predicted_label(p, labels) for p in predictions]


def _settings(gold: list[str], read: list[str | None]) -> dict:
    return {
        "labels": sorted(set(gold)),
        "label_source": "the distinct gold labels (first reference of each example)",
        "normalisation": NORMALISATION,
        "prediction_reading": READING_RULE,
        "predictions_without_label": sum(1 for p in read if p is None),
        "scale": "percent (x100)",
        "n": len(gold),
    }


def _signature(metric: str, gold: list[str], **extra) -> Signature:
    # The label set is counted, not named: labels may hold any character, and the count is what changes a score.
    return Signature.of(metric, __version__, norm="alnum-lower", read="first-words-longest",
                        labels=len(set(gold)), **extra)


def score_labels(predicted: list[str], gold: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 (x100) of class names against gold class names, with their settings."""
    references = [[g] for g in gold]
    acc, f1 = accuracy(predicted, references), macro_f1(predicted, references)
    return {"metrics": {**acc.values, **f1.values, "n": len(gold)}, "settings": f1.settings}
