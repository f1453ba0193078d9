"""ROUGE parity with rouge-score's own scorer, multi-reference rule, sentence splitting for rougeLsum."""

import pytest
from rouge_score import rouge_scorer

from lmcycle.errors import LmcycleError
from lmcycle.evals.rouge import rouge, split_sentences

PREDICTIONS = [
    "Mr. Smith is getting a check-up. Dr. Hawkins advises him to come every year.",
    "#Person1# wants to buy a red car but it is too expensive!",
    "They talk about the weather",
    "",
]
REFERENCES = [
    ["Mr. Smith's getting a check-up, and Doctor Hawkins advises him to have one every year.",
     "Doctor Hawkins tells Mr. Smith to do a check-up every year. He agrees."],
    ["#Person1# likes the red car. The price is too high for #Person1#.",
     "#Person1# cannot afford the red car.",
     "The car is expensive."],
    ["#Person2# and #Person1# discuss the rainy weather. They stay at home."],
    ["Something was said."],
]


def _direct(types, stem, preds, refs, newline_sentences: list[list[str]] | None = None):
    """Mean F1 x100 with rouge-score called directly, in the most literal way."""
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=stem)
    totals = dict.fromkeys(types, 0.0)
    for p, rs in zip(preds, refs, strict=True):
        scores = scorer.score_multi(rs, p)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: 100 * v / len(preds) for t, v in totals.items()}


@pytest.mark.parametrize("stem", [True, False])
def test_rouge_n_and_l_equal_rouge_score_multi_reference(stem):
    ours = rouge(PREDICTIONS, REFERENCES, use_stemmer=stem)
    direct = _direct(("rouge1", "rouge2", "rougeL"), stem, PREDICTIONS, REFERENCES)
    for t, v in direct.items():
        assert ours.values[t] == pytest.approx(v, abs=1e-9)


def test_rouge_lsum_equals_rouge_score_on_newline_split_sentences():
    # Split by hand, independently of our splitter, in the form rouge-score documents for rougeLsum.
    preds = ["Mr. Smith is getting a check-up.\nDr. Hawkins advises him to come every year.",
             "#Person1# wants to buy a red car but it is too expensive!", "They talk about the weather", ""]
    refs = [["Mr. Smith's getting a check-up, and Doctor Hawkins advises him to have one every year.",
             "Doctor Hawkins tells Mr. Smith to do a check-up every year.\nHe agrees."],
            ["#Person1# likes the red car.\nThe price is too high for #Person1#.",
             "#Person1# cannot afford the red car.", "The car is expensive."],
            ["#Person2# and #Person1# discuss the rainy weather.\nThey stay at home."],
            ["Something was said."]]
    ours = rouge(PREDICTIONS, REFERENCES)
    assert ours.values["rougeLsum"] == pytest.approx(_direct(("rougeLsum",), True, preds, refs)["rougeLsum"])
    # Without the split rouge-score gives another number on these texts: the split matters.
    unsplit = _direct(("rougeLsum",), True, PREDICTIONS, REFERENCES)["rougeLsum"]
    assert unsplit != pytest.approx(ours.values["rougeLsum"])


def test_per_example_values_and_mean():
    ours = rouge(PREDICTIONS, REFERENCES)
    assert len(ours.per_example) == len(PREDICTIONS)
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    for p, rs, ex in zip(PREDICTIONS, REFERENCES, ours.per_example, strict=True):
        assert ex["rouge1"] == pytest.approx(100 * max(scorer.score(r, p)["rouge1"].fmeasure for r in rs))
    assert ours.values["rougeL"] == pytest.approx(sum(e["rougeL"] for e in ours.per_example) / len(PREDICTIONS))
    assert ours.per_example[3]["rouge1"] == 0.0  # empty prediction


def test_max_over_references_is_at_least_each_single_reference():
    multi = rouge(PREDICTIONS, REFERENCES)
    for j in range(3):
        single_refs = [[rs[min(j, len(rs) - 1)]] for rs in REFERENCES]
        single = rouge(PREDICTIONS, single_refs)
        for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert multi.values[t] >= single.values[t] - 1e-9
    # A poor extra reference changes nothing (the max ignores it) and alone scores strictly lower.
    poor = "zebra quantum umbrella"
    with_poor = rouge(PREDICTIONS, [[poor, *rs] for rs in REFERENCES])
    poor_only = rouge(PREDICTIONS, [[poor] for _ in REFERENCES])
    for t in multi.values:
        assert with_poor.values[t] == pytest.approx(multi.values[t])
        assert multi.values[t] > poor_only.values[t]


def test_identical_text_scores_100_and_settings_are_recorded():
    s = rouge(["The cat sat. It slept."], [["The cat sat. It slept."]], types=["rouge1", "rougeLsum"])
    assert s.values == {"rouge1": pytest.approx(100.0), "rougeLsum": pytest.approx(100.0)}
    for key in ("package", "stemmer", "tokenizer", "sentence_splitter", "multi_ref", "aggregation"):
        assert s.settings[key]
    assert "0.1.2" in s.settings["package"] or "rouge-score" in s.settings["package"]


def test_split_sentences():
    assert split_sentences("Mr. Smith came. He left! Why? Ok") == ["Mr. Smith came.", "He left!", "Why?", "Ok"]
    assert split_sentences('She said "no." Then left.\nNew line') == ['She said "no."', "Then left.", "New line"]
    assert split_sentences("3.5 million people") == ["3.5 million people"]
    assert split_sentences("") == []


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(LmcycleError, match="2 predictions but 1"):
        rouge(["a", "b"], [["a"]])
    with pytest.raises(LmcycleError, match="non-empty list"):
        rouge(["a"], ["a"])
    with pytest.raises(LmcycleError, match="unknown ROUGE"):
        rouge(["a"], [["a"]], types=["rouge9x"])
