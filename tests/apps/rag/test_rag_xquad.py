import json
from pathlib import Path

import pytest

from lmcycle.apps.rag.xquad_eval import evaluate_xquad_retrieval, ranking_metrics, xquad_corpus

XQUAD = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "xquad_en"


def test_ranking_metrics_by_hand():
    ranked = [["a", "b", "c"], ["b", "a", "c"], ["c", "b", "a"], ["x", "y", "z"]]
    gold = ["a", "a", "a", "a"]  # ranks 1, 2, 3 and missing
    m = ranking_metrics(ranked, gold, ks=(1, 2, 3))
    assert m == pytest.approx({"recall@1": 0.25, "recall@2": 0.5, "recall@3": 0.75, "mrr": (1 + 1 / 2 + 1 / 3) / 4})


@pytest.mark.shared_data
def test_retrieval_on_two_xquad_articles(minilm_encoder):
    if not (XQUAD / "xquad.en.json").is_file():
        pytest.skip(reason=f"XQuAD-en not found at {XQUAD.resolve()} (../shared/data/xquad_en beside the repo)")
    data = json.loads((XQUAD / "xquad.en.json").read_text(encoding="utf-8"))["data"][:2]
    paragraphs, questions = xquad_corpus(XQUAD, articles=2)
    assert len(paragraphs) == sum(len(a["paragraphs"]) for a in data)
    assert len(questions) == sum(len(p["qas"]) for a in data for p in a["paragraphs"])
    assert all(paragraphs[gold] == next(p["context"] for a in data for p in a["paragraphs"]
                                        if any(qa["question"] == q for qa in p["qas"])) for q, gold in questions)
    result = evaluate_xquad_retrieval(XQUAD, minilm_encoder, articles=2)
    assert result["n_questions"] == len(questions)
    chance = 1 / len(paragraphs)
    for method in ("bm25", "dense", "hybrid"):
        m = result[method]
        assert m["recall@1"] <= m["recall@5"] <= m["recall@10"] <= 1.0
        assert m["recall@1"] <= m["mrr"] <= 1.0
        assert m["recall@1"] > 5 * chance  # far better than chance
