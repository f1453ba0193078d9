"""BLEU parity with sacrebleu's own corpus/sentence BLEU, including a variable number of references."""

import pytest
import sacrebleu
from sacrebleu.metrics import BLEU

from lmcycle.errors import LmcycleError
from lmcycle.evals.bleu import bleu, reference_streams

PREDICTIONS = ["The cat sat on the mat.", "#Person1# buys a red car for his wife.", "They discuss the weather.",
               "nothing in common"]
REFERENCES = [["The cat is on the mat.", "A cat sat on the mat."],
              ["#Person1# buys a car.", "#Person1# buys his wife a red car.", "The red car is a gift."],
              ["#Person1# and #Person2# discuss the weather today."],
              ["Completely different words here."]]


def test_single_reference_equals_sacrebleu_corpus_bleu():
    refs = [r[0] for r in REFERENCES]
    ours = bleu(PREDICTIONS, [[r] for r in refs])
    assert ours.values["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [refs]).score, abs=1e-9)


def test_multi_reference_equals_sacrebleu_with_none_padded_streams():
    # Streams written out by hand: the j-th reference of every example, None where an example has fewer.
    streams = [[REFERENCES[0][0], REFERENCES[1][0], REFERENCES[2][0], REFERENCES[3][0]],
               [REFERENCES[0][1], REFERENCES[1][1], None, None],
               [None, REFERENCES[1][2], None, None]]
    expected = BLEU(tokenize="13a").corpus_score(PREDICTIONS, streams)
    ours = bleu(PREDICTIONS, REFERENCES)
    assert ours.values["bleu"] == pytest.approx(expected.score, abs=1e-9)
    assert "nrefs:var" in ours.settings["signature"] and "tok:13a" in ours.settings["signature"]
    assert reference_streams(REFERENCES) == streams


def test_more_references_never_lower_bleu():
    multi = bleu(PREDICTIONS, REFERENCES).values["bleu"]
    for j in range(3):
        single = bleu(PREDICTIONS, [[rs[min(j, len(rs) - 1)]] for rs in REFERENCES]).values["bleu"]
        assert multi >= single - 1e-9
    poor_first = [["zebra quantum umbrella", *rs] for rs in REFERENCES]
    assert bleu(PREDICTIONS, poor_first).values["bleu"] > bleu(PREDICTIONS, [[r[0]] for r in poor_first]).values["bleu"]


def test_sentence_bleu_per_example_equals_sacrebleu():
    ours = bleu(PREDICTIONS, REFERENCES)
    metric = BLEU(tokenize="13a", effective_order=True)
    for p, rs, ex in zip(PREDICTIONS, REFERENCES, ours.per_example, strict=True):
        assert ex["bleu"] == pytest.approx(metric.sentence_score(p, rs).score, abs=1e-9)
    assert ours.per_example[3]["bleu"] < ours.per_example[0]["bleu"]


def test_identical_corpus_is_100_and_mismatch_raises():
    assert bleu(["a b c d e f"], [["a b c d e f"]]).values["bleu"] == pytest.approx(100.0)
    with pytest.raises(LmcycleError):
        bleu(["a"], [])
