"""Score signatures: one short string per metric's settings, equal exactly when the settings are equal."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sacrebleu.metrics import BLEU

from lmcycle.evals.bleu import bleu, reference_streams
from lmcycle.evals.classification import accuracy, macro_f1
from lmcycle.evals.gsm8k import gsm8k_accuracy
from lmcycle.evals.rouge import rouge
from lmcycle.evals.score import Score, Signature
from lmcycle.evals.squad import exact_match, token_f1

_KEY = st.text(st.characters(blacklist_characters=":|", blacklist_categories=("Cs",)), min_size=1, max_size=6)
_VALUE = st.text(st.characters(blacklist_characters="|", blacklist_categories=("Cs",)), max_size=8)
_PAIRS = st.dictionaries(_KEY.filter(lambda k: k not in ("v", "version")), _VALUE, max_size=5).map(
    lambda d: tuple(d.items()))
_SIGNATURES = st.builds(Signature, metric=_KEY, keys=_PAIRS, version=_VALUE, sacrebleu=st.booleans())

WORDS = st.lists(st.sampled_from(["the", "cat", "sat", "on", "mat", "dog", "ran.", "Mr.", "Smith"]), min_size=1,
                 max_size=6).map(" ".join)


def _read_back(sig: Signature) -> Signature:
    return Signature.from_sacrebleu(sig.metric, str(sig)) if sig.sacrebleu else Signature.parse(str(sig))


@given(_SIGNATURES)
def test_parse_reads_back_the_signature(sig):
    assert _read_back(sig) == sig
    assert sig.as_dict() == {**dict(sig.keys), "v": sig.version}


@given(_SIGNATURES, _SIGNATURES)
def test_strings_are_equal_exactly_when_signatures_are(a, b):
    if a.sacrebleu == b.sacrebleu and (a.metric == b.metric or not a.sacrebleu):
        assert (str(a) == str(b)) == (a == b)


def test_the_string_and_its_values():
    sig = Signature.of("rouge", "0.1.2", agg="max", refs=3, stem=True, window=None)
    assert str(sig) == "rouge|agg:max|refs:3|stem:yes|window:none|v:0.1.2"
    assert sig == Signature.parse("rouge|agg:max|refs:3|stem:yes|window:none|v:0.1.2") and hash(sig) == hash(
        Signature.parse(str(sig)))
    assert Signature.parse("a|k:x:y|v:1").keys == (("k", "x:y"),)  # a value may hold ':'


@pytest.mark.parametrize("text", ["rouge", "rouge|agg:max", "rouge|agg|v:1", "|v:1", "rouge|v:1|v:2",
                                  "rouge|k:1|k:2|v:1"])
def test_a_malformed_string_is_an_error(text):
    with pytest.raises(ValueError):
        Signature.parse(text)


@pytest.mark.parametrize("keys", [{"v": "1"}, {"a|b": "1"}, {"a:b": "1"}, {"k": "x|y"}])
def test_a_key_or_value_that_would_not_read_back_is_an_error(keys):
    with pytest.raises(ValueError):
        Signature.of("m", "1", **keys)


def test_score_records_the_signature_and_keeps_its_settings():
    sig = Signature.of("m", "1", k=2)
    score = Score(values={"m": 1.0}, settings={"a": "long"}, signature=sig)
    assert score.settings == {"a": "long", "signature": "m|k:2|v:1", "keys": {"k": "2", "v": "1"}}
    assert Score(values={}, settings={"a": 1}).settings == {"a": 1}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(WORDS, st.lists(WORDS, min_size=1, max_size=3)), min_size=1, max_size=4),
       st.booleans())
def test_rouge_same_settings_same_signature(pairs, stem):
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    a, b = rouge(preds, refs, use_stemmer=stem), rouge(list(reversed(preds)), refs, use_stemmer=stem)
    assert a.signature == b.signature and a.settings["signature"] == b.settings["signature"]
    assert rouge(preds, refs, use_stemmer=not stem).signature != a.signature
    assert Signature.parse(a.settings["signature"]) == a.signature
    counts = {len(r) for r in refs}
    assert a.settings["keys"]["refs"] == (str(counts.pop()) if len(counts) == 1 else "var")


def test_rouge_signature_spelled_out():
    score = rouge(["the cat sat"], [["a cat sat", "the cat", "cats"]])
    assert str(score.signature).startswith("rouge|agg:max|refs:3|stem:porter|lsum:split-sentences|tok:default|v:")
    assert score.settings["package"].endswith(score.settings["keys"]["v"])
    assert rouge(["the cat sat"], [["a cat sat"]]).signature != score.signature  # refs:1


def test_bleu_signature_is_sacrebleus_own():
    preds, refs = ["the cat sat on the mat", "a dog"], [["the cat is on the mat", "a cat sat"], ["the dog"]]
    metric = BLEU(tokenize="13a")
    metric.corpus_score(preds, reference_streams(refs))
    score = bleu(preds, refs)
    assert score.settings["signature"] == str(metric.get_signature()) == str(score.signature)
    assert Signature.from_sacrebleu("bleu", score.settings["signature"]) == score.signature
    assert score.settings["keys"]["tok"] == "13a" and score.settings["keys"]["v"] == score.signature.version
    assert bleu(["x y"], [["x y"]]).signature != score.signature  # nrefs differs


def test_task_metrics_signatures():
    preds, refs = ["Paris", "in 1900"], [["Paris", "paris city"], ["1900"]]
    em, f1 = exact_match(preds, refs), token_f1(preds, refs)
    assert em.signature == exact_match(["x", "y"], refs).signature and em.signature != f1.signature
    assert str(f1.signature).startswith("token_f1|norm:squad-v1.1|tok:whitespace|agg:max|refs:var|v:")
    gsm = gsm8k_accuracy(["so 12", "7"], [["#### 12"], ["#### 8"]])
    assert gsm.signature == gsm8k_accuracy(["1"], [["#### 1"]]).signature
    assert Signature.parse(gsm.settings["signature"]) == gsm.signature
    labels = [["hate"], ["neither"], ["offensive"]]
    acc, mf1 = accuracy(["hate"] * 3, labels), macro_f1(["hate"] * 3, labels)
    assert acc.settings["keys"]["labels"] == "3" and mf1.settings["keys"]["avg"] == "macro"
    assert accuracy(["hate"] * 2, labels[:2]).signature != acc.signature and acc.signature != mf1.signature
