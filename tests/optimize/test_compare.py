"""The comparison table: every number in a row is checked against an independent computation in this process."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertForSequenceClassification

from lmcycle.errors import LmcycleError
from lmcycle.evals.classification import score_labels
from lmcycle.evals.perplexity import perplexity
from lmcycle.models.classifier import TextClassifier
from lmcycle.models.device import describe_device
from lmcycle.optimize.compare import with_ratios
from lmcycle.stages.compare import CompareStage, run_compare
from lmcycle.stages.context import RunContext
from tests.evals.test_toxicity import LABEL_MAP, bert_config, make_word_tokenizer, toy_examples
from tests.train.tiny_lm import examples, make_tokenizer, save_tiny, tiny_llama

FAST = {"latency_runs": 6, "warmup": 1, "batch_size": 4, "throughput_batches": 2, "threads": 1}


def _ctx(tmp_path) -> RunContext:
    ctx = RunContext(run_dir=tmp_path / "run", recipe_file=str(tmp_path / "recipe.yaml"))
    ctx._datasets["toy"] = toy_examples(12, seed=3, bad_label="hate", good_label="neither")
    ctx._datasets["dev"] = examples(10, seed=9)
    return ctx


def _classifier(tmp_path, name: str, seed: int, prune_half: bool = False) -> str:
    tok = make_word_tokenizer()
    torch.manual_seed(seed)
    model = BertForSequenceClassification(bert_config(tok))
    if prune_half:  # zero half of every encoder linear weight, like unstructured 50% pruning
        for module in model.bert.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data.view(-1)[::2] = 0.0
    path = tmp_path / name
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_classifier_rows_match_independent_measurements(tmp_path):
    ctx = _ctx(tmp_path)
    original = _classifier(tmp_path, "original", seed=0)
    pruned = _classifier(tmp_path, "pruned", seed=0, prune_half=True)
    cfg = CompareStage(models=[original, pruned], labels=["original", "pruned"], eval_data=["toy"],
                       label_map=LABEL_MAP, max_len=16, **FAST)
    result = json.loads(open(run_compare(cfg, ctx)["compare"]).read())
    first, second = result["rows"]

    clf = TextClassifier.load(pruned)
    gold = [LABEL_MAP[ex.targets[0]] for ex in ctx.dataset("toy")]
    expected = score_labels(clf.predict([ex.input for ex in ctx.dataset("toy")], max_len=16), gold)["metrics"]
    assert second["quality"]["toy.macro_f1"] == pytest.approx(expected["macro_f1"])
    assert second["quality"]["toy.accuracy"] == pytest.approx(expected["accuracy"])

    n_params = sum(p.numel() for p in clf.model.parameters())
    assert second["params"] == n_params
    encoder_weights = sum(m.weight.numel() for m in clf.model.bert.encoder.modules() if isinstance(m, torch.nn.Linear))
    assert second["zero_params"] >= encoder_weights // 2
    assert first["zero_params"] < second["zero_params"]
    assert second["size_bytes"] == (tmp_path / "pruned" / "model.safetensors").stat().st_size

    for row in (first, second):
        assert row["kind"] == "classifier" and row["threads"] == 1
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
        assert row["throughput"] > 0 and row["peak_memory_mb"] >= 0
    assert first["speedup_b1"] == 1.0 and first["size_ratio"] == 1.0
    assert second["speedup_b1"] == pytest.approx(first["latency_p50_ms"] / second["latency_p50_ms"], rel=1e-3)
    assert result["settings"]["threads"] == 1 and "p50/p95" in result["settings"]["latency"]


def test_language_model_quality_is_perplexity_of_inputs_and_targets(tmp_path):
    ctx = _ctx(tmp_path)
    tok = make_tokenizer()
    model = tiny_llama(tok, seed=1)
    path = save_tiny(model, tok, tmp_path / "lm")
    cfg = CompareStage(models=[path], eval_data=["dev"], max_len=32, **FAST)
    result = json.loads(open(run_compare(cfg, ctx)["compare"]).read())
    row = result["rows"][0]
    texts = [t for ex in ctx.dataset("dev") for t in (ex.input, *ex.targets)]
    expected = perplexity(model.eval(), tok, texts, max_len=32).values["perplexity"]
    assert row["kind"] == "causal_lm"
    assert row["quality"]["dev.perplexity"] == pytest.approx(expected, rel=1e-5)
    # measured on the run's device, and the settings say which (not "cpu" whatever ran)
    assert row["device"] == result["settings"]["device"] == describe_device(ctx.device)
    assert row["params"] == sum(p.numel() for p in model.parameters())


def test_ratios_are_against_the_first_row():
    rows = with_ratios([{"size_bytes": 100, "params": 10, "peak_memory_mb": 50.0, "latency_p50_ms": 4.0,
                         "throughput": 10.0},
                        {"size_bytes": 25, "params": 10, "peak_memory_mb": 20.0, "latency_p50_ms": 2.0,
                         "throughput": 30.0}])
    assert rows[1]["size_ratio"] == 0.25 and rows[1]["memory_ratio"] == 0.4
    assert rows[1]["speedup_b1"] == 2.0 and rows[1]["speedup_throughput"] == 3.0


def test_bad_input_names_the_field(tmp_path):
    ctx = _ctx(tmp_path)
    original = _classifier(tmp_path, "original", seed=0)
    with pytest.raises(LmcycleError, match="labels"):
        run_compare(CompareStage(models=[original], labels=["a", "b"], eval_data=["toy"], **FAST), ctx)
    # labels the classifier does not have and no label_map: the child's error comes back with the model's path
    with pytest.raises(LmcycleError, match="label_map") as info:
        run_compare(CompareStage(models=[original], eval_data=["toy"], **FAST), ctx)
    assert info.value.field == "models" and "original" in str(info.value)


def test_peak_memory_is_the_child_s_own_not_its_parent_s(tmp_path):
    ctx = _ctx(tmp_path)
    original = _classifier(tmp_path, "original", seed=0)
    ballast = torch.ones(200 * 2**20)  # 800 MB in this (parent) process: Linux carries ru_maxrss over fork + exec
    cfg = CompareStage(models=[original], eval_data=["toy"], label_map=LABEL_MAP, max_len=16, **FAST)
    row = json.loads(open(run_compare(cfg, ctx)["compare"]).read())["rows"][0]
    del ballast
    assert 0 <= row["loaded_memory_mb"] <= row["peak_memory_mb"] < 300  # a tiny BERT serving batches of 4
