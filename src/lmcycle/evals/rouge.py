"""ROUGE-1/2/L/Lsum via Google's ``rouge-score`` package, multi-reference, with the settings that produced it.

Pitfalls this module takes care of:

- ``rougeLsum`` is the summary-level LCS over *sentences*, and rouge-score finds sentences only by ``"\\n"``.
  Without splitting, rougeLsum silently equals a different number, so both prediction and references are split
  into sentences first (:func:`split_sentences`, a regex splitter, no nltk) and joined with ``"\\n"``. The
  newlines do not change ROUGE-1/2/L: rouge-score's tokenizer treats every non-``[a-z0-9]`` character as a
  separator.
- rouge-score's default tokenizer lowercases and keeps only ``[a-z0-9]`` tokens, so text in non-Latin scripts
  scores 0. That is recorded in the settings rather than changed, so numbers stay comparable with papers.
- Multiple references: rouge-score's ``score_multi`` scores the prediction against every reference and, for each
  ROUGE type separately, keeps the reference with the highest F-measure.
"""

from __future__ import annotations

import re
from importlib.metadata import version

from lmcycle.errors import LmcycleError
from lmcycle.evals.score import Score, Signature, ref_count

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Abbreviations whose period does not end a sentence (common in dialogue summaries: "Mr. Smith").
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "e.g", "i.e"}
# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) followed by whitespace.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")
SENTENCE_SPLITTER = (
    "regex: split after [.!?]+ (plus closing quotes/brackets) followed by whitespace, and at existing newlines; "
    f"no split after the abbreviations {', '.join(sorted(_ABBREVIATIONS))}"
)


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences (see :data:`SENTENCE_SPLITTER`); empty pieces are dropped."""
    sentences: list[str] = []
    for line in text.split("\n"):
        start = 0
        for m in _SENTENCE_END.finditer(line):
            words = line[start:m.start()].split()
            last_word = words[-1].lower() if words else ""
            if last_word.rstrip(".") in _ABBREVIATIONS and line[m.start():m.end()].strip() == ".":
                continue
            sentences.append(line[start:m.end()].strip())
            start = m.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]


def sentence_lines(text: str) -> str:
    """``text`` with one sentence per line: the form rougeLsum needs."""
    return "\n".join(split_sentences(text))


def rouge(
    predictions: list[str],
    references: list[list[str]],
    *,
    use_stemmer: bool = True,
    types: tuple[str, ...] | list[str] = ROUGE_TYPES,
    multi_ref: str = "max",
) -> Score:
    """ROUGE F1 (x100) of ``predictions[i]`` against the references ``references[i]`` (one or more each).

    Per example, with several references, each ROUGE type takes the maximum F-measure over the references
    (rouge-score's ``score_multi``). The aggregate is the unweighted mean of the per-example F1 values, x100.
    ``per_example[i]`` holds the F1 values (x100) of example ``i``.
    """
    from rouge_score import rouge_scorer

    _check_inputs(predictions, references)
    if multi_ref != "max":
        raise LmcycleError(f"multi_ref must be 'max' (rouge-score's rule), got '{multi_ref}'", field="multi_ref")
    types = tuple(types)
    unknown = [t for t in types if t not in ROUGE_TYPES]
    if unknown or not types:
        raise LmcycleError(f"unknown ROUGE type(s) {unknown}; choose from {', '.join(ROUGE_TYPES)}", field="types")

    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    per_example = []
    for pred, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi([sentence_lines(r) for r in refs], sentence_lines(pred))
        per_example.append({t: 100.0 * scores[t].fmeasure for t in types})
    n = len(per_example)
    values = {t: (sum(e[t] for e in per_example) / n if n else 0.0) for t in types}
    settings = {
        "package": f"rouge-score {version('rouge-score')}",
        "types": list(types),
        "stemmer": "Porter (rouge-score, words longer than 3 characters)" if use_stemmer else "none",
        "tokenizer": "rouge-score default: lowercase, non-[a-z0-9] characters are separators",
        "sentence_splitter": SENTENCE_SPLITTER + " (sentences joined by newline for rougeLsum)",
        "multi_ref": "max F-measure over the references, per ROUGE type (rouge-score score_multi)",
        "aggregation": "mean of per-example F1, x100",
        "n": n,
    }
    # The types are left out: they choose which numbers are reported, not how any one of them is computed.
    signature = Signature.of("rouge", version("rouge-score"), agg="max", refs=ref_count(references),
                             stem="porter" if use_stemmer else "none", lsum="split-sentences", tok="default")
    return Score(values=values, settings=settings, per_example=per_example, signature=signature)


def _check_inputs(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise LmcycleError(f"{len(predictions)} predictions but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise LmcycleError(f"example {i}: references must be a non-empty list of strings")
