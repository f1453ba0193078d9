"""The `reward` recipe stage and `lmcycle rm`: held-out accuracy rises, eval.json, the saved model reloads with
its statistics, backbone choice, errors for non-preference data."""

from __future__ import annotations

import json

import pytest
import tiny_lm
import torch
from test_reward import tiny_bert

from lmcycle.align.reward import (
    RewardModel,
    encode_pairs,
    held_out_reward_metrics,
    load_reward_backbone,
    pair_batches,
)
from lmcycle.cli import main
from lmcycle.config import validate
from lmcycle.data.examples import Example
from lmcycle.data.preferences import examples_from_pairs
from lmcycle.errors import LmcycleError
from lmcycle.stages.context import RunContext
from lmcycle.stages.reward import RewardStage, run_reward

TRAIN = {"max_steps": 40, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "eval_every": 20, "log_every": 10}


def context(tmp_path, model, tok) -> RunContext:
    ctx = RunContext(run_dir=tmp_path / "run", recipe_file=str(tmp_path / "recipe.yaml"))
    ctx.add_artifacts("build", {"model": tiny_lm.save_tiny(model, tok, tmp_path / "build")})
    ctx._datasets["prefs"] = examples_from_pairs(tiny_lm.marker_pairs(96, seed=1, longer_rejected=True))
    ctx._datasets["held_out"] = examples_from_pairs(tiny_lm.marker_pairs(48, seed=2, longer_rejected=True))
    return ctx


def stage(**fields) -> RewardStage:
    return validate(RewardStage, {"model": "build", "data": "prefs", "eval_data": "held_out", "max_len": 64,
                                  "train": TRAIN, **fields})


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_reward_stage_learns_and_saves_a_model_that_reloads_with_its_stats(arch, tok, tmp_path):
    model = tiny_lm.tiny_llama(tok) if arch == "llama" else tiny_bert(tok)
    ctx = context(tmp_path, model, tok)
    produced = run_reward(stage(), ctx)

    report = json.loads(open(produced["eval"]).read())
    assert report["settings"]["backbone"] == ("causal" if arch == "llama" else "classifier")  # auto picked it
    accuracies = [r["eval_accuracy"] for r in ctx.read_metrics("reward") if "step" in r and "eval_accuracy" in r]
    assert len(accuracies) == 2 and report["metrics"]["accuracy"] >= 0.9
    assert report["metrics"]["n"] == 48 and report["settings"]["train_pairs"] == 96

    # The saved model is the trained one: reloaded, it gives the same held-out numbers and keeps its stats.
    reloaded = RewardModel.load(produced["model"]).eval()
    assert reloaded.stats == report["settings"]["normalisation"] and reloaded.stats["std"] > 0
    pairs = tiny_lm.marker_pairs(48, seed=2, longer_rejected=True)
    again = held_out_reward_metrics(reloaded, pair_batches(encode_pairs(pairs, tok, 64), tok, 16))
    assert again["accuracy"] == report["metrics"]["accuracy"]
    assert again["loss"] == pytest.approx(report["metrics"]["loss"], rel=1e-5)
    held = next(r for r in ctx.read_metrics("reward") if r.get("event") == "held_out")
    assert held["eval_accuracy"] == report["metrics"]["accuracy"]


def test_untrained_reward_model_is_near_chance_on_the_held_out_pairs(tok):
    # the baseline the stage test improves on: a fresh scalar head does not know the marker
    model = RewardModel.from_causal_lm(tiny_lm.tiny_llama(tok)).eval()
    pairs = tiny_lm.marker_pairs(48, seed=2, longer_rejected=True)
    assert held_out_reward_metrics(model, pair_batches(encode_pairs(pairs, tok, 64), tok, 16))["accuracy"] < 0.8


def test_backbone_choice(tok, tmp_path):
    path = tiny_lm.save_tiny(tiny_lm.tiny_llama(tok), tok, tmp_path / "llama")
    assert load_reward_backbone(path, "auto")[0].kind == "causal"
    classifier, _ = load_reward_backbone(path, "classifier")  # a decoder read as a one-label classifier
    assert classifier.kind == "classifier" and classifier.backbone.config.num_labels == 1
    assert type(classifier.backbone).__name__ == "LlamaForSequenceClassification"
    t5 = tiny_lm.save_tiny(tiny_lm.tiny_t5(tok), tok, tmp_path / "t5")
    with pytest.raises(LmcycleError, match="encoder-decoder") as err:
        load_reward_backbone(t5, "classifier")
    assert err.value.field == "backbone"


def test_a_saved_reward_model_continues_as_itself(tok, tmp_path):
    torch.manual_seed(0)
    rm = RewardModel.from_causal_lm(tiny_lm.tiny_llama(tok))
    rm.stats = {"mean": 1.0, "std": 2.0}
    rm.save(tmp_path / "rm", tok)
    loaded, _ = load_reward_backbone(str(tmp_path / "rm"))
    assert loaded.kind == "causal" and torch.equal(loaded.head.weight, rm.head.weight)


def test_non_preference_data_is_an_error_naming_the_dataset(tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    ctx._datasets["plain"] = [Example(input="a", targets=["b"], id="x")]
    with pytest.raises(LmcycleError, match="dataset 'plain' is not preference data"):
        run_reward(stage(data="plain"), ctx)


def test_stage_config_rejects_unknown_backbones_and_keys():
    with pytest.raises(LmcycleError) as err:
        stage(backbone="encoder")
    assert err.value.field == "backbone"
    with pytest.raises(LmcycleError, match="unknown key"):
        stage(use_margin=True)


def write_rankings(path, pairs) -> None:
    rows = [{"prompt_id": p.prompt_id, "prompt": p.prompt, "completions": [p.chosen, p.rejected], "ranks": [1, 2]}
            for p in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_lmcycle_rm_command_runs_the_reward_stage(tok, tmp_path, capsys):
    model_dir = tiny_lm.save_tiny(tiny_lm.tiny_llama(tok), tok, tmp_path / "llama")
    write_rankings(tmp_path / "prefs.jsonl", tiny_lm.marker_pairs(40, seed=1))
    (tmp_path / "recipe.yaml").write_text(
        "name: r\ndata:\n  train: {format: rankings, path: prefs.jsonl, split: train}\n"
        "  test: {format: rankings, path: prefs.jsonl, split: test}\nstages: [{type: report}]\n")
    out = tmp_path / "out"
    code = main(["rm", f"model={model_dir}", "data=train", "eval_data=test", "max_len=64", "train.max_steps=2",
                 "train.batch_size=8", "--recipe", str(tmp_path / "recipe.yaml"), "--out", str(out)])
    assert code == 0 and (out / "DONE").exists()
    artifacts = json.loads((out / "artifacts.json").read_text())["reward"]
    printed = capsys.readouterr().out
    assert f"eval: {artifacts['eval']}" in printed
    report = json.loads(open(artifacts["eval"]).read())
    assert report["metrics"]["n"] == 6 and report["settings"]["train_pairs"] == 34  # 15% of 40 prompts held out
    assert "## Alignment" in (out / "report.md").read_text()
