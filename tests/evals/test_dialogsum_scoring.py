"""Multi-reference scoring on real DialogSum test records (three references each) with the extractive baseline."""

import json
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lmcycle.evals.baselines import extractive_baseline
from lmcycle.evals.bleu import bleu
from lmcycle.evals.rouge import rouge

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dialogsum" / "dialogsum.test.jsonl"
N = 40


@pytest.fixture(scope="module")
def records():
    if not DATA.exists():
        pytest.skip(reason=f"DialogSum test split not found at {DATA} (shared data absent)")
    with open(DATA, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(N), f, strict=False)]


@pytest.mark.shared_data
def test_extractive_baseline_with_three_references(records):
    refs = [[r["summary1"], r["summary2"], r["summary3"]] for r in records]
    preds = [extractive_baseline(r["dialogue"]) for r in records]
    multi = rouge(preds, refs)

    # rouge-score directly: max F over the three references for ROUGE-1/2/L.
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for t in ("rouge1", "rouge2", "rougeL"):
        direct = sum(max(scorer.score(x, p)[t].fmeasure for x in rs) for p, rs in zip(preds, refs, strict=True))
        assert multi.values[t] == pytest.approx(100 * direct / N)
    # Each single reference set scores no higher than the max over all three.
    for j in range(3):
        single = rouge(preds, [[rs[j]] for rs in refs])
        assert all(multi.values[t] >= single.values[t] for t in multi.values)

    b = bleu(preds, refs)
    streams = [[rs[j] for rs in refs] for j in range(3)]
    assert b.values["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    assert b.settings["signature"].startswith("nrefs:3|")
    # A loose sanity range: copying three utterances shares some words with a summary, but far from all.
    assert 15 < multi.values["rouge1"] < 45 and 0 < b.values["bleu"] < 20
