"""SQuAD v1.1's official exact match and token F1 (the rules of its ``evaluate-v1.1.py``), multi-reference.

Both texts are normalised by :func:`normalize_answer`: lowercase, remove ASCII punctuation
(``string.punctuation``), remove the articles ``a``/``an``/``the`` (whole words), collapse whitespace. Exact
match is 1 when the normalised texts are equal; token F1 is the F1 of the bags of whitespace tokens of the
normalised texts. Each example takes the maximum over its gold answers; the aggregate is the mean, x100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

from lmcycle import __version__
from lmcycle.errors import LmcycleError
from lmcycle.evals.score import Score, Signature, ref_count

NORMALISATION = ("SQuAD v1.1 official: lowercase; remove ASCII punctuation (string.punctuation); remove the "
                 "articles a/an/the as whole words; collapse whitespace")
_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's answer normalisation (same steps, same order as the official script)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_one(prediction: str, gold: str) -> float:
    """1.0 if the normalised texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1_one(prediction: str, gold: str) -> float:
    """F1 of the overlap of normalised whitespace tokens (bags, so repeats count); 0.0 with no overlap."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: list[str], references: list[list[str]]) -> Score:
    """SQuAD exact match (x100), max over each example's gold answers; ``per_example[i]["exact_match"]``."""
    return _score("exact_match", exact_match_one, predictions, references)


def token_f1(predictions: list[str], references: list[list[str]]) -> Score:
    """SQuAD token F1 (x100), max over each example's gold answers; ``per_example[i]["token_f1"]``."""
    return _score("token_f1", token_f1_one, predictions, references)


def _score(key: str, one: Callable[[str, str], float], predictions: list[str],
           references: list[list[str]]) -> Score:
    if len(predictions) != len(references):
        raise LmcycleError(f"{len(predictions)} predictions but {len(references)} reference lists")
    per_example = []
    for i, (pred, refs) in enumerate(zip(predictions, references, strict=True)):
        if isinstance(refs, str) or not refs:
            raise LmcycleError(f"example {i}: references must be a non-empty list of gold answers")
        per_example.append({key: 100.0 * max(one(pred, ref) for ref in refs)})
    n = len(per_example)
    settings = {
        "definition": "SQuAD v1.1 official (evaluate-v1.1.py)" + (
            "; F1 of the bags of whitespace tokens" if key == "token_f1" else "; normalised strings equal"),
        "normalisation": NORMALISATION,
        "multi_ref": "max over the gold answers",
        "aggregation": "mean over examples, x100",
        "n": n,
    }
    tokens = {"tok": "whitespace"} if key == "token_f1" else {}
    signature = Signature.of(key, __version__, norm="squad-v1.1", **tokens, agg="max", refs=ref_count(references))
    return Score(values={key: sum(e[key] for e in per_example) / n if n else 0.0}, settings=settings,
                 per_example=per_example, signature=signature)
