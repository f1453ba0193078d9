"""The PPO stage end to end on tiny models: it learns (decoder and encoder-decoder), its reference is right, it
resumes exactly, its guard raises alarms and stops, and bad rewards give clear errors."""

from __future__ import annotations

import itertools

import peft
import ppo_toy_rewards
import pytest
import tiny_lm
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmcycle.adapt.lora import LoraConfig, add_lora, lora_layers
from lmcycle.align.ppo import (
    PolicyWithValue,
    kl_estimates,
    pad_episodes,
    reference_scorer,
    sample_responses,
    score_tokens,
    token_logprobs,
)
from lmcycle.config import validate
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig, pad_id_of
from lmcycle.stages.common import start_training_stage
from lmcycle.stages.ppo import PpoRun, PpoStage, load_prompts, ppo_batches, run_ppo

context = tiny_lm.run_context
PROMPTS = [ex.input for ex in tiny_lm.examples(16, seed=3)]


def ppo_cfg(rollouts: int, reward: str = "vowel_a_or_e", **fields) -> PpoStage:
    raw = {"prompts": "reverse", "reward": {"kind": "python", "function": f"ppo_toy_rewards:{reward}"},
           "generation": {"do_sample": True, "max_new_tokens": 2}, "rollouts": rollouts,
           "ppo": {"rollout_size": 16, "ppo_epochs": 4}, "train": {"batch_size": 8, "lr": 1e-2}}
    for key, value in fields.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return validate(PpoStage, raw)


def rollout_rows(ctx, stage: str = "ppo") -> list[dict]:
    return [r for r in ctx.read_metrics(stage) if r.get("event") == "rollout"]


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_ppo_raises_the_reward_of_decoder_and_encoder_decoder_policies(arch, tok, t5_tok, tmp_path):
    tokenizer = t5_tok if arch == "t5" else tok
    model = tiny_lm.tiny_t5(tokenizer) if arch == "t5" else tiny_lm.tiny_llama(tokenizer)
    ctx = context(tmp_path, model, tokenizer)
    produced = run_ppo(ppo_cfg(10), ctx)

    rows = rollout_rows(ctx)
    assert [r["rollout"] for r in rows] == list(range(10))
    first, last = sum(r["score"] for r in rows[:3]) / 3, sum(r["score"] for r in rows[-2:]) / 2
    assert last > first + 0.2
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5) and rows[-1]["kl_k3"] > 0  # leaves the reference
    for key in ("kl_seq", "beta", "entropy", "response_len", "distinct_1", "distinct_2", "repetition"):
        assert key in rows[-1]
    updates = [r for r in ctx.read_metrics("ppo") if r.get("event") == "ppo_update"]
    assert len(updates) == 10 and all(0 <= u["ppo_clipfrac"] <= 1 for u in updates)
    assert (tmp_path / "run" / "ppo" / "samples" / "rollout_0000.jsonl").is_file()
    assert (tmp_path / "run" / "ppo" / "model" / "model.safetensors").is_file() and "adapter" not in produced


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_rollout_log_probs_are_those_the_update_recomputes(arch, tok, t5_tok):
    """ratio = 1 before any update: the rollout's batched, padded scoring equals each row scored alone."""
    tokenizer = t5_tok if arch == "t5" else tok
    build = tiny_lm.tiny_t5 if arch == "t5" else tiny_lm.tiny_llama
    agent = PolicyWithValue(build(tokenizer), beta=0.1)
    ref = reference_scorer(agent, build(tokenizer, seed=1), temperature=0.7)
    decoding = DecodingConfig(do_sample=True, temperature=0.7, max_new_tokens=6)
    responses = sample_responses(agent, tokenizer, PROMPTS[:6], decoding)
    query, query_mask, response, response_mask = pad_episodes(responses, pad_id_of(tokenizer), agent.seq2seq)
    old = score_tokens(agent, query, query_mask, response, response_mask, 0.7, 4, ref)
    k1, _ = kl_estimates(old["logp"], old["ref_logp"])
    assert (k1 * response_mask).sum() != 0  # a different reference model
    for i in range(6):
        n = int(response_mask[i].sum())
        q = query[i][query_mask[i].bool()][None]
        r = response[i, :n][None]
        with torch.no_grad():
            logits, values = agent(q, torch.ones_like(q), r, torch.ones_like(r))
        assert token_logprobs(logits, r, 0.7)[0].tolist() == pytest.approx(old["logp"][i, :n].tolist(), abs=1e-4)
        assert old["logp"][i, n:].abs().sum() == 0 or n == response.size(1)


def test_lora_reference_is_the_base_with_the_adapter_disabled(tok):
    base = tiny_lm.tiny_llama(tok)
    frozen_copy = tiny_lm.tiny_llama(tok)
    policy = tiny_lm.tiny_llama(tok)
    add_lora(policy, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    agent = PolicyWithValue(policy, beta=0.1)
    ref = reference_scorer(agent, None, temperature=1.0)
    q = torch.tensor([[5, 6, 7]])
    r = torch.tensor([[8, 9, 10, 11]])
    ones_q, ones_r = torch.ones_like(q), torch.ones_like(r)
    with torch.no_grad():
        assert torch.allclose(ref(q, ones_q, r, ones_r), token_logprobs(agent(q, ones_q, r, ones_r)[0], r))
        for layer in lora_layers(policy).values():  # the adapter moves the policy away from its base
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
        moved = token_logprobs(agent(q, ones_q, r, ones_r)[0], r)
        reference = ref(q, ones_q, r, ones_r)
        base_logp = token_logprobs(PolicyWithValue(base, 0.0)(q, ones_q, r, ones_r)[0], r)
    assert not torch.allclose(moved, reference, atol=1e-3)
    assert torch.allclose(reference, base_logp, atol=1e-5)
    assert all(layer.active == "default" for layer in lora_layers(policy).values())  # adapter back on
    del frozen_copy


def test_ppo_with_lora_trains_only_the_adapter_and_value_head_and_saves_a_peft_adapter(tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    base_dir = ctx.artifact("build", "model")
    produced = run_ppo(ppo_cfg(2, peft={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}), ctx)
    setup = next(r for r in ctx.read_metrics("ppo") if r.get("event") == "ppo_setup")
    assert setup["reference"] == "adapter disabled"
    adapter = load_file(f"{produced['adapter']}/adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained

    merged = AutoModelForCausalLM.from_pretrained(produced["model"])
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), produced["adapter"])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-5)


def test_ppo_resumes_exactly_after_a_crash(tok, tmp_path):
    full = context(tmp_path / "full", tiny_lm.tiny_llama(tok), tok)
    ppo_toy_rewards.CALLS.update(n=0, fail_at=None)
    run_ppo(ppo_cfg(4, reward="flaky", save_every_rollouts=1), full)

    crashed = context(tmp_path / "crashed", tiny_lm.tiny_llama(tok), tok)
    ppo_toy_rewards.CALLS.update(n=0, fail_at=3)  # the third rollout's reward call fails
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_ppo(ppo_cfg(4, reward="flaky", save_every_rollouts=1), crashed)
    produced = run_ppo(ppo_cfg(4, reward="flaky", save_every_rollouts=1), crashed)

    a = load_file(str(tmp_path / "full" / "run" / "ppo" / "model" / "model.safetensors"))
    b = load_file(f"{produced['model']}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scores = {r["rollout"]: r["score"] for r in rollout_rows(full)}
    assert {r["rollout"]: r["score"] for r in rollout_rows(crashed)} == scores


def test_a_resumed_loop_makes_its_rollout_again_and_skips_the_minibatches_done(tok, tmp_path):
    """ppo_batches from step 5 (rollout 1's second minibatch) serves what a loop from step 0 serves there."""
    cfg = ppo_cfg(2, ppo={"ppo_epochs": 2})  # 2 epochs x 2 minibatches: 4 steps per rollout

    def batches(start: int, n: int) -> list:
        ctx = context(tmp_path / str(start), tiny_lm.tiny_llama(tok), tok)
        stage = start_training_stage(cfg, ctx)
        agent = PolicyWithValue(stage.model, cfg.ppo.beta)
        run = PpoRun(cfg, stage, agent, load_prompts(cfg, ctx), ppo_toy_rewards.vowel_a_or_e, None,
                     reference_scorer(agent, tiny_lm.tiny_llama(tok), 1.0))
        return list(itertools.islice(ppo_batches(run, start), n))  # no updates in between: the same weights

    resumed, full = batches(5, 3), batches(0, 8)[5:]
    assert len(resumed) == 3
    for a, b in zip(resumed, full, strict=True):
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_adaptive_kl_controller_moves_beta(tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    target = 0.02
    run_ppo(ppo_cfg(5, ppo={"kl_target": target, "kl_horizon": 160, "beta": 0.1}), ctx)
    rows = rollout_rows(ctx)
    assert rows[0]["beta"] == pytest.approx(0.1)
    # β after each rollout grows when that rollout's per-token KL was above the target, shrinks when below.
    for now, after in zip(rows, rows[1:], strict=False):
        assert (after["beta"] > now["beta"]) == (now["kl"] > target)
    assert any(r["kl"] > target for r in rows[:-1]) and any(r["kl"] < target for r in rows[:-1])


def test_guard_raises_alarms_and_stops_early(tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    cfg = ppo_cfg(8, reward="length", generation={"max_new_tokens": 12},
                  guard={"kl_max": 1e-6, "early_stop": True, "patience": 2})
    produced = run_ppo(cfg, ctx)
    rows = ctx.read_metrics("ppo")
    alarms = [r for r in rows if r.get("event") == "alarm"]
    stop = [r for r in rows if r.get("event") == "early_stop"]
    assert alarms and all(a["alarm"] == "kl" for a in alarms) and len(stop) == 1
    assert len(rollout_rows(ctx)) < 8  # stopped before the last rollout
    end = next(r for r in rows if r.get("event") == "train_end")
    assert end["step"] == stop[0]["step"] < 8 * 8
    assert (tmp_path / "run" / "ppo" / "model" / "model.safetensors").is_file() and produced["model"]


@pytest.mark.parametrize("reward, message", [("nan_reward", "nan"), ("one_too_few", "one number per response")])
def test_a_bad_reward_function_is_a_clear_error(reward, message, tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    with pytest.raises(LmcycleError, match=message) as e:
        run_ppo(ppo_cfg(1, reward=reward), ctx)
    assert e.value.field == "reward"


def test_generation_settings_come_from_the_recipe(tok, tmp_path):
    entropies = {}
    for temperature in (0.5, 1.3):
        ctx = context(tmp_path / str(temperature), tiny_lm.tiny_llama(tok), tok)
        run_ppo(ppo_cfg(1, generation={"max_new_tokens": 3, "temperature": temperature}, samples=16), ctx)
        samples = (tmp_path / str(temperature) / "run" / "ppo" / "samples" / "rollout_0000.jsonl").read_text()
        assert len(samples.splitlines()) == 16
        row = rollout_rows(ctx)[0]
        assert row["response_len"] <= 4  # 3 new tokens, plus the EOS when the policy chose it
        entropies[temperature] = row["entropy"]
    assert entropies[1.3] > entropies[0.5]  # log-probs and entropies use the sampling temperature


def test_too_few_prompts_and_max_steps_are_refused(tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    with pytest.raises(LmcycleError, match="fewer than one rollout"):
        run_ppo(ppo_cfg(1, ppo={"rollout_size": 128}, train={"batch_size": 8}), ctx)
    with pytest.raises(LmcycleError, match="rollouts"):
        run_ppo(ppo_cfg(1, train={"max_steps": 5}), ctx)


def test_lmcycle_ppo_command(tok, tmp_path, capsys):
    import json

    from lmcycle.cli import main

    model_dir = tiny_lm.save_tiny(tiny_lm.tiny_llama(tok), tok, tmp_path / "policy")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"input": p}) + "\n" for p in PROMPTS))  # prompts only: no targets
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\ndata:\n  p: {{format: jsonl, path: {data}, target_fields: []}}\n"
                      "stages: [{type: report}]\n")
    code = main(["ppo", f"model={model_dir}", "prompts=p", "rollouts=2", "reward.kind=python",
                 "reward.function=ppo_toy_rewards:vowel_a_or_e", "ppo.rollout_size=8", "train.batch_size=4",
                 "generation.max_new_tokens=3", "--recipe", str(recipe), "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    produced = json.loads((tmp_path / "run" / "artifacts.json").read_text())["ppo"]
    assert (tmp_path / "run" / "DONE").exists() and produced["model"].endswith("ppo/model")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout"] for r in rows if r.get("event") == "rollout"] == [0, 1]
