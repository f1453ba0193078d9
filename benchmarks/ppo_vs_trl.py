"""PPO-RLHF episodes/s, peak RSS and reward: lmcycle's ``ppo`` stage vs TRL 1.12's ``trl.experimental.ppo.PPOTrainer``.

    pip install --no-deps --target /work/trl112 trl==1.12.0     # TRL >= 1.13 has no PPO; only the TRL child uses it
    python benchmarks/ppo_vs_trl.py                                   # 8 timed rollouts of 16 (+2), 1 thread per side
    python benchmarks/ppo_vs_trl.py --rollouts 20 --repeats 2 --json ppo-vs-trl.json     # BENCHMARKS.md, ~3.5 min
    python benchmarks/ppo_vs_trl.py --profile     # also a cProfile of our side (its timings then include the profiler)

The output ends with where our time goes per phase (generation, reward, scoring, updates), always measured.

Both sides train the *same* policy (a Llama-style causal LM built here, ~1.8M parameters, saved with
``save_pretrained``) against the *same* reward on the *same* prompts, with the same rollout size, response length,
sampling temperature, PPO epochs, minibatch size, KL coefficient and estimator, clip ranges, GAE settings and
optimizer (fused AdamW, constant learning rate, betas 0.9/0.95, no weight decay, no gradient clipping: TRL's PPO
loop clips nothing), fp32 on CPU (TRL: ``use_cpu=True, bf16=False``, ``gradient_checkpointing=False``).

The reward is a 1-label ``LlamaForSequenceClassification`` built and saved here (seeded random weights, its score
head rescaled so that scores of random text have std 1), reading prompt + response at the last token. TRL gets it
as ``reward_model``; ours reads it through a ``{kind: python}`` reward, :func:`classifier_reward` below, which
tokenizes the prompt and the decoded response and scores them exactly as TRL's ``get_reward`` does (left padding,
position ids over real tokens, the score at the last position). The tokenizer is character-level (printable
ASCII, no merges), so decoding a response and tokenizing it again gives back the very same ids: both sides score
the same token sequences with the same function.

Fixed-length responses: TRL 1.12 with ``stop_token=None`` never stops early, ours stops at EOS. So that both
generate exactly ``--response-length`` tokens, the policy is built so that it cannot sample a special token
(pad/EOS/BOS): residual dimension 0 is a constant (the embeddings hold 0.3 there, no layer writes to it) and the
LM head gives the special tokens a weight of -100 on it, a logit far below -30. Both sides report their mean
response length (it must equal ``--response-length``). ``missing_eos_penalty`` is unset on both, our score clip
is off.

Known differences kept (they are what the two implementations are): TRL's value function is a separate
``AutoModelForSequenceClassification`` (a second copy of the policy's trunk, zero-initialised score head, trained
too), ours is a zero-initialised linear head on the policy's own last hidden state; TRL puts the score one token
past the response's end, ours on its last token; ours skips a minibatch whose mean ratio exceeds 10 (it never
fires here). Both keep a frozen reference copy of the policy (full fine-tuning on both sides).

Ours is the real stage, ``lmcycle.stages.ppo.run_ppo`` with a ``RunContext``, as ``lmcycle run`` calls it.

Timing: rollout 0 is a warm-up; the window runs from the start of rollout 1 to the start of the last rollout
(ours: when ``sample_responses`` is called; TRL: its ``on_step_end`` callback after the previous update, which is
where its next rollout starts), so it covers ``--rollouts`` complete rollouts (generation, reward, scoring, PPO
epochs) and neither side's final save. Episodes/s = rollouts x rollout size / window. Peak RSS = the larger of
``ru_maxrss`` before training and at the end of the window (our ``train()`` resets the kernel's high-water mark
when it starts). Each side runs in its own subprocess, ``--repeats`` times in ABBA order, the fastest run counts.

Reward: each side's mean score per rollout (its own training log), compared over the last ``--last`` rollouts;
and, after training, both final policies are evaluated the same way: lmcycle's ``generate`` samples one response
to each of ``--eval-prompts`` held-out prompts (same seeds, temperature, length) and the classifier scores them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from measure import BUSY_WARNING, cpu_name, load_average, peak_rss_mb, rss_mb, version

NAMES = {"ours": "lmcycle `run_ppo`", "trl": "TRL 1.12 `PPOTrainer`"}
WORDS = ("red green blue cat dog bird sun moon tree river stone wind fire snow rain leaf apple bread milk tea "
         "book door road ship hill lake star cloud").split()
SPECIALS = ["<pad>", "<eos>", "<bos>"]
REWARD_ENV = "LMCYCLE_BENCH_REWARD_MODEL"


# -- shared setup --------------------------------------------------------------------------------------------


def char_tokenizer():
    """Character-level tokenizer over printable ASCII: <pad>=0, <eos>=1, <bos>=2; decode then encode is exact."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)]
    vocab = {**{s: i for i, s in enumerate(SPECIALS)}, **{c: i + len(SPECIALS) for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"the {rng.choice(WORDS)} sees the {rng.choice(WORDS)}:" for _ in range(n)]


def llama_config(tokenizer, hidden: int, layers: int, ffn: int, heads: int, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                       tie_word_embeddings=False, **extra)


@torch.no_grad()
def never_sample_specials(model, token_ids: list[int]) -> None:
    """Make ``token_ids`` unsampleable: residual dim 0 is a positive constant no layer writes, and the LM head
    weighs it -100 for those tokens only (so their logit stays far below -30 while the rest trains)."""
    inner = model.model
    inner.embed_tokens.weight[:, 0] = 0.3
    for layer in inner.layers:
        layer.self_attn.o_proj.weight[0, :] = 0
        layer.mlp.down_proj.weight[0, :] = 0
    model.lm_head.weight[:, 0] = 0
    model.lm_head.weight[token_ids, 0] = -100.0


def prepare(workdir: Path, args: argparse.Namespace) -> dict:
    """Policy to ``workdir/policy``, reward classifier to ``workdir/reward``; the prompts to ``prompts.json``."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    tok = char_tokenizer()
    torch.manual_seed(args.seed)
    policy = LlamaForCausalLM(llama_config(tok, args.hidden, args.layers, args.ffn, args.heads))
    never_sample_specials(policy, [tok.convert_tokens_to_ids(s) for s in SPECIALS])
    policy.save_pretrained(workdir / "policy")
    tok.save_pretrained(workdir / "policy")

    torch.manual_seed(args.seed + 1)
    rm = LlamaForSequenceClassification(llama_config(tok, 64, 2, 128, 2, num_labels=1)).eval()
    rng = torch.Generator().manual_seed(args.seed + 2)
    probe = torch.randint(len(SPECIALS), len(tok), (64, 40), generator=rng)
    with torch.no_grad():
        rm.score.weight /= rm(probe).logits[:, 0].std()  # random text scores with std 1
    rm.save_pretrained(workdir / "reward")
    tok.save_pretrained(workdir / "reward")

    train_prompts = prompts(args.prompts, args.seed)
    eval_prompts = prompts(args.eval_prompts, args.seed + 1000)
    (workdir / "prompts.json").write_text(json.dumps({"train": train_prompts, "eval": eval_prompts}), "utf-8")
    os.environ[REWARD_ENV] = str(workdir / "reward")
    initial = evaluate(policy, tok, eval_prompts, args)
    return {"params": sum(p.numel() for p in policy.parameters()),
            "reward_params": sum(p.numel() for p in rm.parameters()), "vocab": len(tok),
            "initial_eval_reward": initial["eval_reward"]}


_REWARD_MODEL: dict = {}


@torch.no_grad()
def score_ids(rows: list[list[int]]) -> torch.Tensor:
    """The classifier's score [N] of token rows, as TRL's ``get_reward`` computes it: left padding, position ids
    over real tokens, the score head on the last position's hidden state."""
    from transformers import AutoModelForSequenceClassification

    path = os.environ[REWARD_ENV]
    if path not in _REWARD_MODEL:
        _REWARD_MODEL[path] = AutoModelForSequenceClassification.from_pretrained(path).eval()
    model = _REWARD_MODEL[path]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = mask.cumsum(1) - mask
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return model.score(hidden.last_hidden_state[:, -1]).squeeze(-1).float()


def classifier_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Our ``{kind: python}`` reward: the benchmark's classifier on prompt + response tokens (see the docstring)."""
    tok = char_tokenizer()
    rows = [tok(p)["input_ids"] + tok(r)["input_ids"] for p, r in zip(prompts, responses, strict=True)]
    return score_ids(rows)


def evaluate(model, tokenizer, eval_prompts: list[str], args: argparse.Namespace) -> dict:
    """The same held-out check for both final policies: sample one response per prompt, score it."""
    from lmcycle.models.generate import DecodingConfig, generate_ids

    cfg = DecodingConfig(do_sample=True, temperature=args.temperature, max_new_tokens=args.response_length,
                         seed=args.seed + 99, batch_size=32)
    new = generate_ids(model, tokenizer, eval_prompts, cfg)
    rows = [tokenizer(p)["input_ids"] + ids for p, ids in zip(eval_prompts, new, strict=True)]
    return {"eval_reward": float(score_ids(rows).mean()), "eval_response_len": statistics.mean(map(len, new))}


# -- one side (subprocess) -------------------------------------------------------------------------------------


class RolloutClock:
    """Wall/CPU times at the start of each rollout; ``ru_maxrss`` at the start of the last one."""

    def __init__(self, last: int):
        self.last = last
        self.wall: dict[int, float] = {}
        self.cpu: dict[int, float] = {}
        self.peak_rss = float("nan")

    def starts(self, i: int) -> None:
        self.wall.setdefault(i, time.perf_counter())
        self.cpu.setdefault(i, time.process_time())
        if i == self.last:
            self.peak_rss = peak_rss_mb()


def run_ours(workdir: Path, args: argparse.Namespace, clock: RolloutClock, out: Path) -> dict:
    import lmcycle.align.ppo as ppo_math
    import lmcycle.stages.ppo as ppo_stage
    from lmcycle.artifacts import load_model
    from lmcycle.config import validate
    from lmcycle.data.examples import Example
    from lmcycle.stages.context import RunContext
    from lmcycle.stages.ppo import PpoStage, run_ppo

    phases = {"generate": 0.0, "reward": 0.0, "score_tokens": 0.0, "rollout_total": 0.0}
    counted = [False]  # only rollouts inside the timed window count towards the phase times

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if counted[0]:
                    phases[name] += time.perf_counter() - start
        return wrapper

    # A rollout is made from its sample_responses call (step 1) to the end of its rollout_stats (before logging).
    sample_responses, rollout_stats, rollout_started = ppo_stage.sample_responses, ppo_stage.rollout_stats, [0.0]

    def clocked_sampling(*a, **kw):
        i = len(clock.wall)
        clock.starts(i)
        counted[0] = 1 <= i < clock.last
        rollout_started[0] = time.perf_counter()
        return sample_responses(*a, **kw)

    def clocked_stats(*a, **kw):
        try:
            return rollout_stats(*a, **kw)
        finally:
            if counted[0]:
                phases["rollout_total"] += time.perf_counter() - rollout_started[0]

    ppo_stage.sample_responses, ppo_stage.rollout_stats = clocked_sampling, clocked_stats
    ppo_math.decode_rows = timed("generate", ppo_math.decode_rows)
    ppo_stage.score_tokens = timed("score_tokens", ppo_stage.score_tokens)
    # The stage imports the reward as "<this file's stem>:classifier_reward": a module apart from __main__.
    reward_module = importlib.import_module(Path(__file__).stem)
    reward_module.classifier_reward = timed("reward", reward_module.classifier_reward)

    data = json.loads((workdir / "prompts.json").read_text("utf-8"))
    ctx = RunContext(run_dir=out / "run", seed=args.seed)
    ctx.add_artifacts("build", {"model": str(workdir / "policy")})
    ctx._datasets["prompts"] = [Example(input=p, targets=[p]) for p in data["train"]]
    cfg = validate(PpoStage, {
        "prompts": "prompts", "reward": {"kind": "python", "function": f"{Path(__file__).stem}:classifier_reward"},
        "generation": {"do_sample": True, "temperature": args.temperature, "max_new_tokens": args.response_length,
                       "batch_size": args.rollout_size, "seed": args.seed},
        "rollouts": args.rollouts + 2, "samples": 0,
        "ppo": {"rollout_size": args.rollout_size, "ppo_epochs": args.ppo_epochs, "beta": args.kl_coef,
                "kl_estimator": "k1", "gamma": 1.0, "lam": 0.95, "clip_ratio": 0.2, "clip_value": 0.2,
                "vf_coef": 0.1, "entropy_coef": 0.0, "score_clip": None, "missing_eos_penalty": None,
                "forward_batch_size": args.rollout_size},
        "train": {"batch_size": args.minibatch, "lr": args.lr, "max_grad_norm": None, "seed": args.seed,
                  "log_every": 1000},
    })
    mem = {"rss_before_train_mb": rss_mb(), "maxrss_before_train_mb": peak_rss_mb()}
    produced = run_ppo(cfg, ctx)
    rows = [r for r in ctx.read_metrics("ppo") if r.get("event") == "rollout"]
    skipped = sum(r.get("ppo_skipped", 0) for r in ctx.read_metrics("ppo") if r.get("event") == "ppo_update")
    model, tok = load_model(produced["model"])
    return {**mem, "scores": [r["score"] for r in rows], "response_len": [r["response_len"] for r in rows],
            "kl": [r["kl"] for r in rows], "phases": phases, "ratio_guard_skips": skipped,
            **evaluate(model, tok, data["eval"], args)}


def run_trl(workdir: Path, args: argparse.Namespace, clock: RolloutClock, out: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if trl.__version__ != "1.12.0":
        sys.exit(f"the TRL side needs trl 1.12.0 on PYTHONPATH (found {trl.__version__}): see --trl-path")
    data = json.loads((workdir / "prompts.json").read_text("utf-8"))
    tok = AutoTokenizer.from_pretrained(workdir / "policy", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(workdir / "policy")
    ref = AutoModelForCausalLM.from_pretrained(workdir / "policy")
    value = AutoModelForSequenceClassification.from_pretrained(workdir / "policy", num_labels=1)
    with torch.no_grad():
        value.score.weight.zero_()  # as our value head starts
    reward = AutoModelForSequenceClassification.from_pretrained(workdir / "reward")
    encode = lambda texts: Dataset.from_dict({"input_ids": [tok(t)["input_ids"] for t in texts]})  # noqa: E731

    class ClockAndLogs(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            clock.starts(state.global_step)  # update u (1-based) has ended: rollout u (0-based) starts now

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                rows.append(dict(logs))

    rows: list[dict] = []
    total = (args.rollouts + 2) * args.rollout_size
    config = PPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        eval_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=args.seed,
        per_device_train_batch_size=args.rollout_size, gradient_accumulation_steps=1,
        num_mini_batches=args.rollout_size // args.minibatch, num_ppo_epochs=args.ppo_epochs,
        total_episodes=total, local_rollout_forward_batch_size=args.rollout_size,
        response_length=args.response_length, temperature=args.temperature, stop_token=None,
        missing_eos_penalty=None, kl_coef=args.kl_coef, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2,
        vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=False, num_sample_generations=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, weight_decay=0.0, optim="adamw_torch_fused", gradient_checkpointing=False,
        sft_model_path=str(workdir / "policy"), reward_model_path=str(workdir / "reward"),
    )
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=encode(data["train"]), value_model=value,
                         eval_dataset=encode(data["eval"][:args.rollout_size]), callbacks=[ClockAndLogs()])
    mem = {"rss_before_train_mb": rss_mb(), "maxrss_before_train_mb": peak_rss_mb()}
    clock.starts(0)
    trainer.train()
    eos_tokens = sum(r["val/num_eos_tokens"] for r in rows)
    return {**mem, "scores": [r["objective/scores"] for r in rows],
            "response_len": [float(args.response_length)] * len(rows), "eos_tokens_sampled": eos_tokens,
            "kl": [r["objective/kl"] / args.response_length for r in rows],
            **evaluate(trainer.policy_model, tok, data["eval"], args)}


def run_side(side: str, workdir: Path, args: argparse.Namespace) -> dict:
    """Train on one side; return its timing, memory, reward curve (also written to ``workdir/<side>.json``)."""
    os.environ[REWARD_ENV] = str(workdir / "reward")
    clock = RolloutClock(last=args.rollouts + 1)
    load_before = load_average()
    out = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=workdir))
    if args.profile and side == "ours":
        import cProfile

        profiler = cProfile.Profile()
        res = profiler.runcall(run_ours, workdir, args, clock, out)
        profiler.dump_stats(str(workdir / "ours.prof"))
    else:
        res = {"ours": run_ours, "trl": run_trl}[side](workdir, args, clock, out)
    window = clock.wall[clock.last] - clock.wall[1]
    cpu = clock.cpu[clock.last] - clock.cpu[1]
    episodes = args.rollouts * args.rollout_size
    last = res["scores"][-args.last:]
    result = {
        "side": side, "threads": torch.get_num_threads(), "window_s": window, "episodes_per_s": episodes / window,
        "episodes_per_cpu_s": episodes / cpu, "cpu_share": cpu / (window * torch.get_num_threads()),
        "load_average": [load_before, load_average()],
        "peak_rss_mb": max(clock.peak_rss, res["maxrss_before_train_mb"]),
        "rss_growth_mb": max(clock.peak_rss, res["maxrss_before_train_mb"]) - res["rss_before_train_mb"],
        "final_reward": statistics.mean(last), "final_kl": statistics.mean(res["kl"][-args.last:]),
        "mean_response_len": statistics.mean(res["response_len"]), **res,
    }
    (workdir / f"{side}.json").write_text(json.dumps(result), encoding="utf-8")
    return result


# -- main: both sides, the table -------------------------------------------------------------------------------


def child_args(args: argparse.Namespace) -> list[str]:
    keys = ("rollouts", "rollout_size", "minibatch", "ppo_epochs", "response_length", "temperature", "kl_coef",
            "lr", "hidden", "layers", "ffn", "heads", "prompts", "eval_prompts", "threads", "seed", "last")
    out = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    return out + (["--profile"] if args.profile else [])


def spawn_side(side: str, workdir: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--workdir", str(workdir), *child_args(args)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if side == "trl":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.trl_path, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{side} side failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads((workdir / f"{side}.json").read_text(encoding="utf-8"))


def phase_table(ours: dict) -> list[str]:
    """Where our time goes, from the timed rollouts: generation, reward, scoring, the rest of the rollout, updates."""
    ph, window = ours["phases"], ours["window_s"]
    rest = ph["rollout_total"] - ph["generate"] - ph["reward"] - ph["score_tokens"]
    update = window - ph["rollout_total"]
    rows = [("generation (`decode_rows`, KV cache)", ph["generate"]), ("reward (classifier)", ph["reward"]),
            ("scoring: old log-probs, values, reference log-probs (`score_tokens`)", ph["score_tokens"]),
            ("rest of the rollout (padding, KL, GAE, stats)", rest),
            ("PPO updates (forward + backward + AdamW, all epochs) and loop", update)]
    lines = ["", f"where our time goes ({window:.1f} s window):", "", "| phase | s | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {s:.2f} | {s / window:.0%} |" for name, s in rows]
    return lines


def table(s: dict) -> str:
    ours, theirs = s["sides"]["ours"], s["sides"]["trl"]
    lines = [
        f"PPO, {date.today()}, {cpu_name()}, torch {version('torch')}, transformers {version('transformers')}, "
        f"TRL {s['trl_version']}; load average {s['load_average']}",
        f"policy {s['info']['params']:,} params (llama, vocab {s['info']['vocab']}), reward classifier "
        f"{s['info']['reward_params']:,}; {s['rollouts']} timed rollouts x {s['rollout_size']} episodes, "
        f"{s['response_length']} new tokens, {s['ppo_epochs']} PPO epochs, minibatch {s['minibatch']}, "
        f"{s['threads']} thread(s) per side",
        "",
        "| implementation | episodes/s | episodes/CPU-s | CPU share | peak RSS (MiB) | RSS growth (MiB) "
        f"| mean response length | train reward (last {s['last']} rollouts) | KL/token (last {s['last']}) "
        "| held-out reward after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side, r in s["sides"].items():
        lines.append(f"| {NAMES[side]} | {r['episodes_per_s']:.2f} | {r['episodes_per_cpu_s']:.2f} | "
                     f"{r['cpu_share']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} | "
                     f"{r['mean_response_len']:.1f} | {r['final_reward']:.3f} | {r['final_kl']:.3f} | "
                     f"{r['eval_reward']:.3f} |")
    lines.append(f"| **ours / TRL** | **{s['ratio_episodes_per_s']:.2f}x** | {s['ratio_episodes_per_cpu_s']:.2f}x | | "
                 f"**{s['ratio_peak_rss']:.2f}x** | {s['ratio_rss_growth']:.2f}x | | "
                 f"{ours['final_reward'] - theirs['final_reward']:+.3f} | | "
                 f"{ours['eval_reward'] - theirs['eval_reward']:+.3f} |")
    fmt = ", ".join
    lines += [
        "",
        f"held-out reward of the initial policy: {s['info']['initial_eval_reward']:.3f}",
        f"train reward per rollout: ours [{fmt(f'{x:.2f}' for x in ours['scores'])}]",
        f"                          TRL  [{fmt(f'{x:.2f}' for x in theirs['scores'])}]",
        f"all runs, episodes/s: ours {ours['all_episodes_per_s']}, TRL {theirs['all_episodes_per_s']}; "
        f"EOS tokens TRL sampled: {theirs['eos_tokens_sampled']}; minibatches our ratio guard skipped: "
        f"{ours.get('ratio_guard_skips', 'n/a')}",
    ]
    if "phases" in ours:
        lines += phase_table(ours)
    if min(r["cpu_share"] for r in s["sides"].values()) < 0.95:
        lines.append(BUSY_WARNING)
    return "\n".join(lines)


def summarise(info: dict, runs: dict[str, list[dict]], args: argparse.Namespace, trl_version: str) -> dict:
    sides = {}
    for side, results in runs.items():
        best = max(results, key=lambda r: r["episodes_per_s"])
        sides[side] = {**best, "all_episodes_per_s": [round(r["episodes_per_s"], 2) for r in results],
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                       "rss_growth_mb": max(r["rss_growth_mb"] for r in results)}
    ours, theirs = sides["ours"], sides["trl"]
    loads = [x for results in runs.values() for r in results for x in r["load_average"]]
    return {"info": info, "trl_version": trl_version, "sides": sides,
            "load_average": f"{min(loads):.1f}-{max(loads):.1f}",
            "ratio_episodes_per_s": ours["episodes_per_s"] / theirs["episodes_per_s"],
            "ratio_episodes_per_cpu_s": ours["episodes_per_cpu_s"] / theirs["episodes_per_cpu_s"],
            "ratio_peak_rss": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
            "ratio_rss_growth": ours["rss_growth_mb"] / theirs["rss_growth_mb"],
            **{k: getattr(args, k) for k in ("rollouts", "rollout_size", "response_length", "ppo_epochs",
                                             "minibatch", "threads", "last")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=8, help="timed rollouts (2 more run: warm-up, end marker)")
    parser.add_argument("--rollout-size", type=int, default=16, help="episodes per rollout")
    parser.add_argument("--minibatch", type=int, default=8, help="episodes per optimizer step")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=24, help="new tokens per response (fixed)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (TRL's default)")
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=256, help="training prompts")
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts for the final check")
    parser.add_argument("--last", type=int, default=3, help="rollouts averaged for the final train reward")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side (ABBA order); the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-path", default="/work/trl112", help="folder with trl 1.12.0 (pip --target)")
    parser.add_argument("--profile", action="store_true", help="time our phases and keep a cProfile dump")
    parser.add_argument("--json", help="also write the summary to this JSON file")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rollout_size % args.minibatch:
        parser.error("--rollout-size must be a multiple of --minibatch")
    torch.set_num_threads(args.threads)
    if args.side:
        run_side(args.side, args.workdir, args)
        return

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmcycle-ppo-bench-") as tmp:
        workdir = Path(tmp)
        info = prepare(workdir, args)
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        order = [side for r in range(args.repeats) for side in (("ours", "trl") if r % 2 == 0 else ("trl", "ours"))]
        for side in order:
            runs[side].append(spawn_side(side, workdir, args))
            r = runs[side][-1]
            print(f"{side}: {r['episodes_per_s']:.2f} episodes/s, CPU share {r['cpu_share']:.2f}, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MiB, reward {r['final_reward']:.3f}", file=sys.stderr)
        if args.profile:
            import pstats

            stats = pstats.Stats(str(workdir / "ours.prof"))
            stats.sort_stats("cumulative").print_stats(40)
    summary = summarise(info, runs, args, "1.12.0")
    summary["benchmark_wall_s"] = round(time.perf_counter() - started, 1)
    print(table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
