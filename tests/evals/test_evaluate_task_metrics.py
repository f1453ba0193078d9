"""EvalStage with the classification, extractive-QA and GSM8K metrics, end to end on a tiny local Llama."""

from __future__ import annotations

import json

import pytest

from lmcycle.config import validate
from lmcycle.data.examples import Example
from lmcycle.errors import LmcycleError
from lmcycle.evals.classification import accuracy, macro_f1
from lmcycle.evals.gsm8k import gsm8k_accuracy
from lmcycle.evals.squad import exact_match, token_f1
from lmcycle.models.generate import DecodingConfig
from lmcycle.stages.context import RunContext
from lmcycle.stages.eval import EvalStage, run_eval

LABELLED = [Example(input=f"the weather is nice {i}", targets=[label], id=f"t{i}")
            for i, label in enumerate(["neither", "offensive", "hate", "neither"])]
NUMERIC = [Example(input=f"Context: The station opened in {1900 + i}.\nQuestion: When?",
                   targets=[str(1900 + i), f"in {1900 + i}"], id=f"q{i}") for i in range(3)]
DECODING = DecodingConfig(max_new_tokens=4, stop=["\n"], batch_size=4)


def _run(tmp_path, model_dir, **stage):
    ctx = RunContext(run_dir=tmp_path / "run")
    ctx._datasets.update({"tweets": list(LABELLED), "qa": list(NUMERIC)})
    ctx.add_artifacts("m", {"model": str(model_dir)})
    produced = run_eval(EvalStage(model="m", decoding=DECODING, perplexity=False, **stage), ctx)
    rows = [json.loads(line) for line in open(produced["predictions"], encoding="utf-8")]
    return rows, json.load(open(produced["eval"], encoding="utf-8")), ctx


def test_classification_metrics_in_eval_json(tmp_path, tiny_model_dir):
    rows, result, ctx = _run(tmp_path, tiny_model_dir, name="tweets_before", data="tweets",
                             template="classify_tweet", metrics=["accuracy", "macro_f1"])
    preds, refs = [r["prediction"] for r in rows], [r["references"] for r in rows]
    assert refs == [ex.targets for ex in LABELLED] and all(r["prompt"].endswith("Label:") for r in rows)
    expected_acc, expected_f1 = accuracy(preds, refs), macro_f1(preds, refs)
    assert result["metrics"]["accuracy"] == pytest.approx(expected_acc.values["accuracy"])
    assert result["metrics"]["macro_f1"] == pytest.approx(expected_f1.values["macro_f1"])
    assert {"f1_hate", "f1_neither", "f1_offensive"} <= set(result["metrics"])
    assert [r["accuracy"] for r in rows] == [e["accuracy"] for e in expected_acc.per_example]
    assert all("macro_f1" not in r for r in rows)  # a property of the set, not of one example
    settings = result["settings"]
    assert settings["accuracy"]["normalisation"] and settings["macro_f1"]["labels"] == ["hate", "neither",
                                                                                          "offensive"]
    assert settings["template"] == "classify_tweet" and "rouge" not in result["metrics"]
    logged = [m for m in ctx.read_metrics("tweets_before") if m.get("kind") == "eval"]
    assert logged[0]["accuracy"] == pytest.approx(result["metrics"]["accuracy"])


def test_qa_and_gsm8k_metrics_in_eval_json(tmp_path, tiny_model_dir):
    rows, result, _ = _run(tmp_path, tiny_model_dir, data="qa", template="extractive_qa",
                           metrics=["exact_match", "token_f1", "gsm8k_accuracy"])
    preds, refs = [r["prediction"] for r in rows], [r["references"] for r in rows]
    for name, fn in (("exact_match", exact_match), ("token_f1", token_f1), ("gsm8k_accuracy", gsm8k_accuracy)):
        score = fn(preds, refs)
        assert result["metrics"][name] == pytest.approx(score.values[name])
        assert result["settings"][name] == score.settings
        assert [r[name] for r in rows] == [e[name] for e in score.per_example]
    assert "SQuAD" in result["settings"]["exact_match"]["definition"]


def test_new_metric_names_validate():
    stage = validate(EvalStage, {"type": "eval", "data": "d", "metrics": ["accuracy", "macro_f1", "exact_match",
                                                                          "token_f1", "gsm8k_accuracy"]})
    assert stage.metrics[-1] == "gsm8k_accuracy"
    with pytest.raises(LmcycleError, match="metrics"):
        validate(EvalStage, {"type": "eval", "data": "d", "metrics": ["f1"]})
