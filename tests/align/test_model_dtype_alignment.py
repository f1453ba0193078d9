"""``model_dtype: bfloat16`` in the alignment stages: PPO's value head, LoRA adapters and a reward model's head stay
float32 on a bfloat16 base; the frozen full-FT reference is held in bfloat16 too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_lm
import torch
from safetensors.torch import load_file

import lmcycle.stages.ppo as ppo_module
from lmcycle.align.reward import RewardModel
from lmcycle.config import validate
from lmcycle.data.preferences import examples_from_pairs
from lmcycle.stages.dpo import DpoStage, run_dpo
from lmcycle.stages.ppo import PpoStage, run_ppo
from lmcycle.stages.reward import RewardStage, run_reward


def context(tmp_path, tok):
    ctx = tiny_lm.run_context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    ctx._datasets["prefs"] = examples_from_pairs(tiny_lm.marker_pairs(64, seed=0))
    ctx._datasets["held_out"] = examples_from_pairs(tiny_lm.marker_pairs(24, seed=99))
    return ctx


def dtypes_of(path: str | Path) -> set[torch.dtype]:
    return {t.dtype for t in load_file(str(path)).values()}


@pytest.fixture
def ppo_trained(monkeypatch):
    """name -> (dtype, requires_grad) of what run_ppo's loop trained (policy and value head), and the reference."""
    seen = {}
    real_train, real_scorer = ppo_module.train, ppo_module.reference_scorer

    def train(agent, *args, **kwargs):
        seen["params"] = {n: (p.dtype, p.requires_grad) for n, p in agent.named_parameters()}
        return real_train(agent, *args, **kwargs)

    def reference_scorer(agent, ref_model, temperature):
        seen["reference"] = None if ref_model is None else {p.dtype for p in ref_model.parameters()}
        return real_scorer(agent, ref_model, temperature)

    monkeypatch.setattr(ppo_module, "train", train)
    monkeypatch.setattr(ppo_module, "reference_scorer", reference_scorer)
    return seen


def ppo_cfg(**fields) -> PpoStage:
    return validate(PpoStage, {"prompts": "reverse", "model_dtype": "bfloat16",
                               "reward": {"kind": "python", "function": "ppo_toy_rewards:vowel_a_or_e"},
                               "generation": {"do_sample": True, "max_new_tokens": 2}, "rollouts": 2,
                               "ppo": {"rollout_size": 16, "ppo_epochs": 2}, "train": {"batch_size": 8, "lr": 1e-2},
                               **fields})


def test_lora_ppo_in_bfloat16_trains_a_float32_adapter_and_value_head(tok, tmp_path, ppo_trained):
    ctx = context(tmp_path, tok)
    produced = run_ppo(ppo_cfg(peft={"r": 4, "alpha": 8}), ctx)
    params = ppo_trained["params"]
    trainable = {n for n, (_, grad) in params.items() if grad}
    assert {"value_head.weight", "value_head.bias"} <= trainable
    assert all(".lora_" in n or n.startswith("value_head.") for n in trainable)
    assert {params[n][0] for n in trainable} == {torch.float32}
    assert {dtype for dtype, grad in params.values() if not grad} == {torch.bfloat16}
    assert ppo_trained["reference"] is None  # the reference is the base with the adapter off
    assert dtypes_of(Path(produced["adapter"]) / "adapter_model.safetensors") == {torch.float32}
    assert dtypes_of(Path(produced["model"]) / "model.safetensors") == {torch.bfloat16}
    scores = [r["score"] for r in ctx.read_metrics("ppo") if r.get("event") == "rollout"]
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)


def test_full_ppo_in_bfloat16_holds_policy_and_reference_in_bfloat16_and_the_value_head_in_float32(
        tok, tmp_path, ppo_trained):
    run_ppo(ppo_cfg(), context(tmp_path, tok))
    params = ppo_trained["params"]
    assert {params["value_head.weight"], params["value_head.bias"]} == {(torch.float32, True)}
    assert {v for n, v in params.items() if not n.startswith("value_head.")} == {(torch.bfloat16, True)}
    assert ppo_trained["reference"] == {torch.bfloat16}


def test_lora_dpo_in_bfloat16_learns_and_saves_a_float32_adapter(tok, tmp_path):
    ctx = context(tmp_path, tok)
    produced = run_dpo(validate(DpoStage, {"data": "prefs", "eval_data": "held_out", "max_len": 64,
                                           "model_dtype": "bfloat16", "peft": {"r": 4, "alpha": 8},
                                           "train": {"max_steps": 12, "batch_size": 8, "lr": 1e-2}}), ctx)
    assert json.loads(Path(produced["eval"]).read_text())["metrics"]["accuracy"] >= 0.9
    assert dtypes_of(Path(produced["adapter"]) / "adapter_model.safetensors") == {torch.float32}
    assert dtypes_of(Path(produced["model"]) / "model.safetensors") == {torch.bfloat16}


def test_a_bfloat16_reward_model_saves_a_bfloat16_backbone_and_a_float32_head(tok, tmp_path):
    ctx = context(tmp_path, tok)
    produced = run_reward(validate(RewardStage, {"model": "build", "data": "prefs", "eval_data": "held_out",
                                                 "max_len": 64, "model_dtype": "bfloat16",
                                                 "train": {"max_steps": 12, "batch_size": 8, "lr": 3e-3}}), ctx)
    model_dir = Path(produced["model"])
    assert dtypes_of(model_dir / "model.safetensors") == {torch.bfloat16}
    assert dtypes_of(model_dir / "reward_head.safetensors") == {torch.float32}
    assert json.loads(Path(produced["eval"]).read_text())["metrics"]["accuracy"] >= 0.9
    # Loaded for scoring (PPO's reward) it is float32 by default, or held in the dtype asked for.
    assert {p.dtype for p in RewardModel.load(model_dir).backbone.parameters()} == {torch.float32}
    assert {p.dtype for p in RewardModel.load(model_dir, dtype=torch.bfloat16).backbone.parameters()} == {
        torch.bfloat16}
