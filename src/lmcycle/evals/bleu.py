"""BLEU via sacrebleu (tokenizer 13a), multi-reference, with sacrebleu's signature string.

sacrebleu is the reference implementation; nltk and others give different numbers. Corpus BLEU is the headline
number; sentence BLEU per example (with ``effective_order=True``, as sacrebleu recommends for single sentences)
is kept for per-example inspection.

Multiple references: sacrebleu takes *reference streams* — stream ``j`` holds the ``j``-th reference of every
example. The per-example reference lists are transposed into streams; an example with fewer references than
the most any example has is padded with ``None``, which sacrebleu drops for that example (the signature then
says ``nrefs:var``). Within an example, n-gram matches are clipped by the maximum count over its references
and the closest reference length is used for the brevity penalty (sacrebleu's rules).
"""

from __future__ import annotations

from lmcycle.evals.rouge import _check_inputs
from lmcycle.evals.score import Score, Signature


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Transpose per-example reference lists into sacrebleu's reference streams, padding with ``None``."""
    width = max((len(r) for r in references), default=0)
    return [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]


def bleu(predictions: list[str], references: list[list[str]]) -> Score:
    """Corpus BLEU (sacrebleu, 13a) of ``predictions`` against ``references[i]`` (one or more per example).

    ``values`` = ``{"bleu": corpus BLEU}``; ``per_example[i]`` = ``{"bleu": sentence BLEU of example i}``.
    """
    from sacrebleu.metrics import BLEU

    _check_inputs(predictions, references)
    corpus_metric = BLEU(tokenize="13a")
    corpus = corpus_metric.corpus_score(predictions, reference_streams(references))
    sentence_metric = BLEU(tokenize="13a", effective_order=True)
    per_example = [{"bleu": sentence_metric.sentence_score(p, refs).score}
                   for p, refs in zip(predictions, references, strict=True)]
    settings = {
        "signature": str(corpus_metric.get_signature()),
        # nrefs of a sentence signature describes only the last sentence scored, so it is left out.
        "sentence_signature": "|".join(part for part in str(sentence_metric.get_signature()).split("|")
                                       if not part.startswith("nrefs:")),
        "multi_ref": "sacrebleu reference streams (the j-th reference of every example); examples with fewer "
                     "references are padded with None, which sacrebleu drops",
        "aggregation": "corpus BLEU (n-gram statistics summed over the corpus); per-example values are "
                       "sentence BLEU with effective order",
        "n": len(predictions),
    }
    return Score(values={"bleu": corpus.score}, settings=settings, per_example=per_example,
                 signature=Signature.from_sacrebleu("bleu", settings["signature"]))
