"""PPO memory with a frozen reference copy (full fine-tuning) vs LoRA with the adapter disabled as the reference.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/ppo_reference_memory.py     # ~1 min; memory only, not timed
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/ppo_reference_memory.py --json ppo-memory.json

The course's claim: with LoRA, PPO "reduces memory by half", because the reference policy is the same network with
the adapter switched off instead of a second copy. This runs lmcycle's real ``ppo`` stage (``run_ppo`` with a
``RunContext``) on an lmcycle-built llama-10m twice, each in its own subprocess: ``full`` (every weight trains; the
reference is a frozen copy of the starting model) and ``lora`` (``peft: {method: lora}``; the reference is the
policy with its adapter disabled). Same prompts, reward (a cheap Python function: the share of the letters a/e in
the response), rollouts, batch and seed.

Reported per variant:

- **parameter bytes held**: every distinct tensor (parameters and buffers, counted once by storage) of the policy,
  its value head and the reference model, as they are when training starts (captured from ``reference_scorer``);
- **gradient bytes**: trainable parameters x 4 (fp32);
- **optimizer-state bytes**: the AdamW state in the stage's final checkpoint (``exp_avg``, ``exp_avg_sq``, steps);
- **peak RSS**: the ``train_end`` row's ``peak_rss_mb`` (the process's resident high-water mark during the training
  loop, which holds every model) and the larger of that and ``ru_maxrss`` before training; **RSS growth**: peak minus
  the resident memory after imports, before the stage loads anything.

Run with ``MALLOC_MMAP_THRESHOLD_=65536`` (the children inherit it): with glibc's default, freed activation blocks
stay in the heap and LoRA's many small tensors fragment it, so RSS says little about what is held (see
BENCHMARKS.md, "Training memory per PEFT method"). The script warns when it is not set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from measure import cpu_name, load_average, peak_rss_mb, rss_mb, version

VARIANTS = {"full": "full fine-tuning, frozen reference copy", "lora": "LoRA, reference = adapter disabled"}


def vowel_share(prompts: list[str], responses: list[str]) -> list[float]:
    """The reward: the share of the letters a and e among a response's characters."""
    return [sum(c in "ae" for c in r) / max(len(r), 1) for r in responses]


def dialogues(n: int, seed: int) -> list:
    from lmcycle.data.synthetic import synthetic_dialogues

    return synthetic_dialogues(n, seed)


def prepare(workdir: Path, args: argparse.Namespace) -> dict:
    """Tokenizer + llama model of ``--size`` to ``workdir/model``."""
    from lmcycle.models.build import build_model, train_tokenizer

    exs = dialogues(400, args.seed)
    tokenizer = train_tokenizer([t for ex in exs for t in (ex.input, *ex.targets)], 2048, seq2seq=False,
                                max_len=args.max_len)
    model = build_model("llama", args.size, tokenizer, args.max_len, seed=args.seed)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    cfg = model.config
    return {"params": sum(p.numel() for p in model.parameters()), "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size, "vocab": cfg.vocab_size, "tied": bool(cfg.tie_word_embeddings)}


def tensor_bytes(*modules) -> int:
    """Bytes of the distinct storages of all parameters and buffers of ``modules`` (shared ones counted once)."""
    seen: dict[int, int] = {}
    for module in modules:
        if module is None:
            continue
        for t in [*module.parameters(), *module.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def optimizer_state_bytes(stage_dir: Path) -> int:
    """Bytes of the tensors in the AdamW state of the stage's newest checkpoint."""
    path = max(stage_dir.glob("checkpoints/step-*/optimizer.pt"), key=lambda p: int(p.parent.name.split("-")[1]))
    state = torch.load(path, weights_only=True)["state"]
    return sum(v.numel() * v.element_size() for s in state.values() for v in s.values() if torch.is_tensor(v))


def run_variant(variant: str, workdir: Path, args: argparse.Namespace) -> dict:
    import lmcycle.stages.ppo as ppo_stage
    from lmcycle.config import validate
    from lmcycle.data.examples import Example
    from lmcycle.stages.context import RunContext
    from lmcycle.stages.ppo import PpoStage, run_ppo

    held: dict[str, int] = {}
    scorer = ppo_stage.reference_scorer

    def measuring_scorer(agent, ref_model, temperature):  # called once, after every model is in place
        held["policy"] = tensor_bytes(agent.policy)
        held["value_head"] = tensor_bytes(agent.value_head)
        held["reference"] = tensor_bytes(agent, ref_model) - tensor_bytes(agent)  # what a copy adds
        held["total"] = tensor_bytes(agent, ref_model)
        held["trainable_params"] = sum(p.numel() for p in agent.parameters() if p.requires_grad)
        return scorer(agent, ref_model, temperature)

    ppo_stage.reference_scorer = measuring_scorer
    ctx = RunContext(run_dir=workdir / f"run-{variant}", seed=args.seed)
    ctx.add_artifacts("build", {"model": str(workdir / "model")})
    ctx._datasets["prompts"] = [Example(input=ex.input[: args.prompt_chars], targets=ex.targets)
                                for ex in dialogues(args.rollout_size * 4, args.seed + 1)]
    raw = {"prompts": "prompts", "reward": {"kind": "python", "function": f"{Path(__file__).stem}:vowel_share"},
           "generation": {"do_sample": True, "max_new_tokens": args.new_tokens, "batch_size": args.rollout_size},
           "rollouts": args.rollouts, "samples": 0,
           "ppo": {"rollout_size": args.rollout_size, "ppo_epochs": args.ppo_epochs,
                   "forward_batch_size": args.rollout_size},
           "train": {"batch_size": args.batch, "lr": 1e-5, "seed": args.seed}}
    if variant == "lora":
        raw["peft"] = {"method": "lora", "r": args.rank, "alpha": 2 * args.rank}
    before = {"rss_before_mb": rss_mb(), "maxrss_before_mb": peak_rss_mb()}
    run_ppo(validate(PpoStage, raw), ctx)
    end = next(r for r in ctx.read_metrics("ppo") if r.get("event") == "train_end")
    setup = next(r for r in ctx.read_metrics("ppo") if r.get("event") == "ppo_setup")
    peak = max(end["peak_rss_mb"], before["maxrss_before_mb"])
    result = {"variant": variant, "reference": setup["reference"], **held, **before,
              "gradient_bytes": held["trainable_params"] * 4,
              "optimizer_state_bytes": optimizer_state_bytes(workdir / f"run-{variant}" / "ppo"),
              "train_peak_rss_mb": end["peak_rss_mb"], "peak_rss_mb": peak,
              "rss_growth_mb": peak - before["rss_before_mb"],
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "load_average": load_average()}
    (workdir / f"{variant}.json").write_text(json.dumps(result), encoding="utf-8")
    return result


def child_args(args: argparse.Namespace) -> list[str]:
    keys = ("size", "max_len", "rollouts", "rollout_size", "batch", "ppo_epochs", "new_tokens", "prompt_chars",
            "rank", "threads", "seed")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def spawn(variant: str, workdir: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--workdir", str(workdir), *child_args(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        sys.exit(f"{variant} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads((workdir / f"{variant}.json").read_text(encoding="utf-8"))


def table(info: dict, runs: dict[str, dict], args: argparse.Namespace) -> str:
    mib = 2 ** 20
    full, lora = runs["full"], runs["lora"]
    lines = [
        f"PPO memory, {date.today()}, {cpu_name()}, torch {version('torch')}, transformers {version('transformers')}; "
        f"MALLOC_MMAP_THRESHOLD_={full['malloc_mmap_threshold']}; load average "
        f"{min(r['load_average'] for r in runs.values()):.1f}-{max(r['load_average'] for r in runs.values()):.1f}",
        f"llama-{args.size}: {info['params']:,} params (L={info['layers']}, d={info['hidden']}, vocab {info['vocab']}, "
        f"tied embeddings: {info['tied']}); {args.rollouts} rollouts x {args.rollout_size} prompts of "
        f"<= {args.prompt_chars} characters, {args.new_tokens} new tokens, {args.ppo_epochs} PPO epoch(s), "
        f"minibatch {args.batch}, LoRA r={args.rank} on the attention projections",
        "",
        "| variant | trainable params | policy (MiB) | reference adds (MiB) | value head (KiB) | parameters held (MiB) "
        "| gradients (MiB) | optimizer state (MiB) | peak RSS (MiB) | RSS growth (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        lines.append(f"| {VARIANTS[name]} | {r['trainable_params']:,} | {r['policy'] / mib:.1f} | "
                     f"{r['reference'] / mib:.1f} | {r['value_head'] / 1024:.1f} | {r['total'] / mib:.1f} | "
                     f"{r['gradient_bytes'] / mib:.1f} | {r['optimizer_state_bytes'] / mib:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} |")
    held = lambda r: r["total"] + r["gradient_bytes"] + r["optimizer_state_bytes"]  # noqa: E731
    lines += [f"| **LoRA / full** | | | | | **{lora['total'] / full['total']:.2f}x** | "
              f"{lora['gradient_bytes'] / full['gradient_bytes']:.3f}x | "
              f"{lora['optimizer_state_bytes'] / full['optimizer_state_bytes']:.3f}x | "
              f"**{lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x** | "
              f"{lora['rss_growth_mb'] / full['rss_growth_mb']:.2f}x |",
              "", f"parameters + gradients + optimizer state: full {held(full) / mib:.1f} MiB, LoRA "
              f"{held(lora) / mib:.1f} MiB ({held(lora) / held(full):.2f}x)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="10m", choices=["100k", "1m", "10m"])
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--rollouts", type=int, default=2)
    parser.add_argument("--rollout-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="episodes per optimizer step")
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, default=400, help="prompts are dialogue openings this long")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant:
        run_variant(args.variant, args.workdir, args)
        return
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        print("WARNING: MALLOC_MMAP_THRESHOLD_ is not set: glibc's heap keeps freed blocks and the RSS figures "
              "mostly measure fragmentation; run with MALLOC_MMAP_THRESHOLD_=65536", file=sys.stderr)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmcycle-ppo-mem-") as tmp:
        workdir = Path(tmp)
        info = prepare(workdir, args)
        runs = {v: spawn(v, workdir, args) for v in VARIANTS}
    print(table(info, runs, args))
    if args.json:
        summary = {"info": info, "runs": runs, "benchmark_wall_s": round(time.perf_counter() - started, 1)}
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
