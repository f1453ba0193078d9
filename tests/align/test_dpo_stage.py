"""The `dpo` recipe stage and `lmcycle dpo`: full and LoRA, the held-out implicit-reward metrics and eval.json,
the reference (precomputed or a frozen copy), the PEFT-format adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import tiny_lm
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmcycle.align.dpo import train_dpo
from lmcycle.cli import main
from lmcycle.config import validate
from lmcycle.data.examples import Example
from lmcycle.data.preferences import examples_from_pairs
from lmcycle.errors import LmcycleError
from lmcycle.stages.context import RunContext
from lmcycle.stages.dpo import DpoStage, run_dpo
from lmcycle.train.loop import TrainConfig


def context(tmp_path, tok) -> RunContext:
    ctx = RunContext(run_dir=tmp_path / "run", recipe_file=str(tmp_path / "recipe.yaml"))
    ctx.add_artifacts("build", {"model": tiny_lm.save_tiny(tiny_lm.tiny_llama(tok), tok, tmp_path / "build")})
    ctx._datasets["prefs"] = examples_from_pairs(tiny_lm.marker_pairs(64, seed=0))
    ctx._datasets["held_out"] = examples_from_pairs(tiny_lm.marker_pairs(24, seed=99))
    return ctx


def stage(lr: float, **fields) -> DpoStage:
    train = {"max_steps": 30, "batch_size": 8, "lr": lr, "eval_every": 15, "log_every": 10,
             **fields.pop("train", {})}
    return validate(DpoStage, {"data": "prefs", "eval_data": "held_out", "max_len": 64, "train": train, **fields})


def held_out_rows(ctx, name="dpo") -> list[dict]:
    return [r for r in ctx.read_metrics(name) if "step" in r and "eval_accuracy" in r]


def test_full_dpo_stage_learns_and_writes_eval_json(tok, tmp_path):
    ctx = context(tmp_path, tok)
    produced = run_dpo(stage(3e-3), ctx)
    assert set(produced) == {"model", "eval"}
    report = json.loads(Path(produced["eval"]).read_text())
    rows = held_out_rows(ctx)
    assert [r["step"] for r in rows] == [15, 30]
    m = report["metrics"]
    assert m["accuracy"] >= 0.9 and m["margin"] > 0.03 and m["loss"] < math.log(2) - 0.02 and m["n"] == 24
    assert m["chosen_reward"] - m["rejected_reward"] == pytest.approx(m["margin"], abs=1e-6)
    assert m["accuracy"] == rows[-1]["eval_accuracy"]  # eval.json holds the final held-out evaluation
    assert report["settings"]["peft"] is None and report["settings"]["train_pairs"] == 64
    data = next(r for r in ctx.read_metrics("dpo") if r.get("event") == "data")
    assert data["reference"] == "precomputed"
    # the saved policy is the trained one: it differs from the start and loads as a plain causal LM
    start = load_file(str(Path(ctx.artifact("build", "model")) / "model.safetensors"))
    saved = load_file(str(Path(produced["model"]) / "model.safetensors"))
    assert set(saved) == set(start) and any(not torch.equal(saved[k], start[k]) for k in start)
    AutoModelForCausalLM.from_pretrained(produced["model"])


def test_a_frozen_reference_copy_trains_like_precomputed_reference_log_probs(tok, tmp_path):
    precomputed = context(tmp_path / "a", tok)
    copied = context(tmp_path / "b", tok)
    fast = json.loads(Path(run_dpo(stage(3e-3, train={"max_steps": 6}), precomputed)["eval"]).read_text())
    slow = json.loads(Path(run_dpo(stage(3e-3, train={"max_steps": 6}, precompute_reference=False),
                                   copied)["eval"]).read_text())
    assert next(r for r in copied.read_metrics("dpo") if r.get("event") == "data")["reference"] == "frozen copy"
    for key in ("loss", "margin", "chosen_reward", "rejected_reward"):
        assert slow["metrics"][key] == pytest.approx(fast["metrics"][key], abs=1e-4), key


def sample_logits(model) -> torch.Tensor:
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_dpo_stage_saves_a_peft_adapter_and_the_merged_model(tok, tmp_path):
    ctx = context(tmp_path, tok)
    produced = run_dpo(stage(1e-2, peft={"method": "lora", "r": 4, "alpha": 8}), ctx)
    assert set(produced) == {"model", "adapter", "eval"}
    report = json.loads(Path(produced["eval"]).read_text())
    assert report["metrics"]["accuracy"] >= 0.9 and report["settings"]["peft"]["r"] == 4
    assert next(r for r in ctx.read_metrics("dpo") if r.get("event") == "data")["reference"] == "adapter disabled"
    assert (Path(produced["adapter"]) / "adapter_config.json").is_file()
    base_dir = ctx.artifact("build", "model")
    merged = AutoModelForCausalLM.from_pretrained(produced["model"]).eval()
    with_adapter = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                                  produced["adapter"]).eval()
    torch.testing.assert_close(sample_logits(with_adapter), sample_logits(merged), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sample_logits(AutoModelForCausalLM.from_pretrained(base_dir).eval()),
                              sample_logits(merged), atol=1e-4)


def test_non_preference_data_and_missing_reference_are_errors(tok, tmp_path):
    ctx = context(tmp_path, tok)
    ctx._datasets["plain"] = [Example(input="a", targets=["b"], id="x")]
    with pytest.raises(LmcycleError, match="dataset 'plain' is not preference data"):
        run_dpo(stage(1e-3, data="plain"), ctx)
    model = tiny_lm.tiny_llama(tok)
    with pytest.raises(LmcycleError, match="needs a reference") as err:
        train_dpo(model, tok, tiny_lm.marker_pairs(4, 0), TrainConfig(max_steps=1), tmp_path / "x",
                  lambda **k: None, precompute_reference=False)
    assert err.value.field == "precompute_reference"


@pytest.mark.parametrize(("fields", "field"), [({"beta": 0}, "beta"), ({"loss_type": "hinge"}, "loss_type"),
                                               ({"label_smoothing": 0.5}, "label_smoothing"),
                                               ({"peft": {"method": "qlora"}}, "peft.method")])
def test_bad_stage_settings_name_the_field(fields, field):
    with pytest.raises(LmcycleError) as err:
        stage(1e-3, **fields)
    assert err.value.field == field


def test_lmcycle_dpo_command_runs_the_dpo_stage(tok, tmp_path):
    model_dir = tiny_lm.save_tiny(tiny_lm.tiny_llama(tok), tok, tmp_path / "llama")
    rows = [{"prompt_id": p.prompt_id, "prompt": p.prompt, "completions": [p.chosen, p.rejected], "ranks": [1, 2]}
            for p in tiny_lm.marker_pairs(40, seed=1)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "recipe.yaml").write_text(
        "name: d\ndata:\n  train: {format: rankings, path: prefs.jsonl, split: train}\n"
        "  test: {format: rankings, path: prefs.jsonl, split: test}\nstages: [{type: report}]\n")
    out = tmp_path / "out"
    code = main(["dpo", f"model={model_dir}", "data=train", "eval_data=test", "loss_type=ipo", "max_len=64",
                 "train.max_steps=2", "--recipe", str(tmp_path / "recipe.yaml"), "--out", str(out)])
    assert code == 0 and (out / "DONE").exists()
    produced = json.loads((out / "artifacts.json").read_text())["dpo"]
    report = json.loads(Path(produced["eval"]).read_text())
    assert report["settings"]["loss_type"] == "ipo" and report["metrics"]["n"] == 6
    text = (out / "report.md").read_text()
    assert "## Alignment" in text and "| dpo | full | ipo, β=0.1 | 34 | 6 |" in text
    assert "## Evaluation" not in text  # an alignment stage's eval.json is not a generation eval row
    assert (out / "plots" / "alignment_accuracy.png").is_file()
