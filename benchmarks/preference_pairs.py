"""What ``reward_vs_trl.py`` and ``dpo_vs_trl.py`` share: the model, the preference pairs, the step order, one
side per subprocess, the summary table.

The model is an lmcycle-built llama (tokenizer trained on the benchmark's own training texts,
``save_pretrained`` to a local folder). The pairs (``--data``):

- ``hh`` (the default when the file is there): the first ``--examples`` pairs of the real Anthropic HH-RLHF
  harmless-base file in ``/work/shared/data/hh_rlhf`` (empty replies dropped, as the recipes do), with its real
  spread of lengths (one-turn to many-turn dialogues); the next 64 pairs are the held-out set.
- ``synthetic``: synthetic dialogues rendered with the ``summarize`` template: the prompt is
  ``template.render(ex, [])``, chosen its own summary, rejected the summary of the next dialogue. Their lengths
  vary little, so length grouping gains little there. Held out: 64 dialogues of another seed.

Batches: TRL gets the pairs in the order ``micro_batch_indices`` gives (plain shuffling, what TRL's default
``train_sampling_strategy="random"`` does too; TRL does not group by length unless told to) and a sequential
sampler. Ours uses what the stages use: length-grouped batches (``pair_step_indices`` with
``group_by_length=True``, i.e. ``grouped_batch_indices``) unless ``--no-group``. Both sides take ``--batch``
pairs per step from the same seeded epoch permutation, so only which pairs share a batch differs, and the
per-step losses are no longer comparable one to one: each side reports its mean training loss and the held-out
loss before and after training (lmcycle's metric functions, in eval mode, outside the timed window).
Both sides: fp32, AdamW (fused, lr 1e-4 unless given, betas 0.9/0.95, eps 1e-8, no weight decay), constant
learning rate, gradient clipping at 1.0, a log line every step, no saving.

Timing: from the start of optimizer step ``warmup`` to the start of step ``warmup + steps`` (ours from the call of
``batch_at(step)``, TRL from ``on_step_begin``); steps/s and pairs/s over that window. Memory: ``ru_maxrss`` of
the side's own process at the start of the last step (the larger of that and the value before training, as
``lora_sft_vs_trl.py``), and its growth over the resident memory right before training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from measure import BUSY_WARNING, Clock, cpu_name, load_average, peak_rss_mb, rss_mb, version

ADAM = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
TEMPLATE = "summarize"
HH_FILE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh_rlhf" / \
    "harmless-base.test.shared.jsonl.gz"
HELD_OUT = 64


def pairs(args: argparse.Namespace) -> list:
    """The benchmark's training preference pairs (``PreferencePair``)."""
    return _all_pairs(args)[:args.examples]


def held_out_pairs(args: argparse.Namespace) -> list:
    """``HELD_OUT`` pairs that are not trained on."""
    if args.data == "hh":
        return _all_pairs(args)[args.examples:args.examples + HELD_OUT]
    return _synthetic_pairs(HELD_OUT, args.seed + 1)


def _all_pairs(args: argparse.Namespace) -> list:
    if args.data == "hh":
        from lmcycle.data.preferences import drop_empty_replies, load_hh_rlhf

        hh, _ = drop_empty_replies(load_hh_rlhf(HH_FILE))
        if len(hh) < args.examples + HELD_OUT:
            sys.exit(f"--examples {args.examples}: the HH file has {len(hh)} pairs, {HELD_OUT} are held out")
        return hh
    return _synthetic_pairs(args.examples, args.seed)


def _synthetic_pairs(n: int, seed: int) -> list:
    """Synthetic dialogues as pairs: chosen = the dialogue's own summary, rejected = the next one's."""
    from lmcycle.data.preferences import PreferencePair
    from lmcycle.data.synthetic import synthetic_dialogues
    from lmcycle.data.templates import get_template

    template = get_template(TEMPLATE)
    exs = synthetic_dialogues(n, seed)
    return [PreferencePair(f"p{i}", template.render(ex, []), template.render_target(ex),
                           template.render_target(exs[(i + 1) % len(exs)])) for i, ex in enumerate(exs)]


def step_order(n_pairs: int, args: argparse.Namespace) -> list[list[int]]:
    """The pair indices of every optimizer step (one micro-batch per step)."""
    from lmcycle.train.loop import micro_batch_indices

    return [micro_batch_indices(n_pairs, s, args.batch, 1, args.seed)[0] for s in range(total_steps(args))]


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup + args.steps + 1


def build_model_dir(workdir: Path, args: argparse.Namespace) -> dict:
    """Tokenizer + llama of ``args.size`` saved to ``workdir/model``; returns its size facts."""
    from lmcycle.data.synthetic import synthetic_dialogues
    from lmcycle.models.build import build_model, train_tokenizer

    if args.data == "hh":
        texts = [t for p in pairs(args) for t in (p.prompt, p.chosen, p.rejected)]
    else:
        texts = [t for ex in synthetic_dialogues(args.examples, args.seed) for t in (ex.input, *ex.targets)]
    tokenizer = train_tokenizer(texts, 2048, seq2seq=False, max_len=args.max_len)
    model = build_model("llama", args.size, tokenizer, args.max_len, seed=0)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    return {"params": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size, "vocab": model.config.vocab_size}


def run_side(side: str, workdir: Path, args: argparse.Namespace,
             runners: dict[str, Callable[[Path, argparse.Namespace, Clock, Path], tuple[list[float], dict]]]) -> dict:
    """Train on one side; write its timing, memory and losses to ``workdir/<side>.json``."""
    clock = Clock(args.warmup, args.steps)
    load_before = load_average()
    out_dir = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=workdir))  # fresh: our loop would resume from it
    losses, extra = runners[side](workdir, args, clock, out_dir)
    peak = max(clock.peak_rss, extra.pop("maxrss_before_train_mb"))
    result = {"side": side, "threads": torch.get_num_threads(), "window_s": clock.window(),
              "steps_per_s": args.steps / clock.window(), "pairs_per_s": args.steps * args.batch / clock.window(),
              "median_step_s": clock.median_step(),
              "cpu_share": clock.cpu_window() / (clock.window() * torch.get_num_threads()),
              "load_average": [load_before, load_average()], "peak_rss_mb": peak,
              "rss_growth_mb": peak - extra.pop("rss_before_train_mb"), "losses": losses,
              "mean_loss": statistics.mean(losses), **extra}
    (workdir / f"{side}.json").write_text(json.dumps(result), encoding="utf-8")
    return result


def memory_before_training() -> dict:
    return {"rss_before_train_mb": rss_mb(), "maxrss_before_train_mb": peak_rss_mb()}


def spawn_side(script: str, side: str, workdir: Path, args: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    """Run one side in a fresh interpreter (its own peak RSS)."""
    flags = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    flags += ["--no-group"] if args.no_group else []
    cmd = [sys.executable, script, "--side", side, "--workdir", str(workdir), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        sys.exit(f"{side} side failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads((workdir / f"{side}.json").read_text(encoding="utf-8"))


def run_both(script: str, args: argparse.Namespace, keys: tuple[str, ...], prepare: Callable[[Path], dict]) -> dict:
    """Prepare the shared files, run the sides ``args.repeats`` times in ABBA order; the best steps/s counts."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmcycle-pref-bench-") as tmp:
        workdir = Path(tmp)
        info = prepare(workdir)
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        order = [s for r in range(args.repeats) for s in (("ours", "trl") if r % 2 == 0 else ("trl", "ours"))]
        for side in order:
            r = spawn_side(script, side, workdir, args, keys)
            runs[side].append(r)
            print(f"{side}: {r['steps_per_s']:.3f} steps/s, CPU share {r['cpu_share']:.2f}, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MiB", file=sys.stderr)
    sides = {}
    for side, results in runs.items():
        best = max(results, key=lambda r: r["steps_per_s"])
        sides[side] = {**best, "all_steps_per_s": [round(r["steps_per_s"], 3) for r in results],
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                       "rss_growth_mb": max(r["rss_growth_mb"] for r in results)}
    ours, trl = sides["ours"], sides["trl"]
    return {"date": date.today().isoformat(), "size": f"llama-{args.size}", "model": info, "batch": args.batch,
            "data": args.data, "group_by_length": not args.no_group,
            "max_len": args.max_len, "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
            "lr": args.lr, "threads": args.threads, "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": version("transformers"), "trl": version("trl"), "python": platform.python_version(),
            "cpu": cpu_name(), "sides": sides,
            "ratio_steps_per_s": ours["steps_per_s"] / trl["steps_per_s"],
            "ratio_peak_rss": ours["peak_rss_mb"] / trl["peak_rss_mb"],
            "ratio_rss_growth": ours["rss_growth_mb"] / max(trl["rss_growth_mb"], 1e-9),
            "benchmark_wall_s": round(time.perf_counter() - started, 1)}


def table(s: dict, names: dict[str, str], what: str) -> str:
    m = s["model"]
    loads = [x for side in s["sides"].values() for x in side["load_average"]]
    data = "HH-RLHF harmless-base" if s["data"] == "hh" else "synthetic-dialogue"
    grouping = "length-grouped" if s["group_by_length"] else "plainly shuffled"
    lines = [f"{what}: {s['size']} ({m['params'] / 1e6:.2f}M params), batch {s['batch']} pairs, max_len "
             f"{s['max_len']} ({m['pairs']} {data} pairs, tokens per sequence mean {m['mean_len']:.0f} / median "
             f"{m['median_len']:.0f} / max {m['max_len_seen']}), ours {grouping}, TRL plainly shuffled, fp32, lr "
             f"{s['lr']}, {s['warmup']} warmup + {s['steps']} timed steps, best of {s['repeats']} run(s) per side",
             f"{s['cpu']}, {s['cores']} cores, {s['threads']} torch threads, 1-min load average "
             f"{min(loads):.1f}-{max(loads):.1f}; torch {s['torch']}, transformers {s['transformers']}, trl "
             f"{s['trl']}, Python {s['python']}", "",
             "| framework | steps/s | pairs/s | median step (s) | CPU share | peak RSS (MiB) | RSS growth (MiB) "
             "| mean train loss | held-out loss before → after |", "|---|---|---|---|---|---|---|---|---|"]
    for side in ("ours", "trl"):
        r = s["sides"][side]
        lines.append(f"| {names[side]} | {r['steps_per_s']:.3f} | {r['pairs_per_s']:.2f} | {r['median_step_s']:.3f} "
                     f"| {r['cpu_share']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} | "
                     f"{r['mean_loss']:.4f} | {r['eval_loss_before']:.4f} → {r['eval_loss_after']:.4f} |")
    lines.append(f"| **ours / TRL** | **{s['ratio_steps_per_s']:.2f}x** | | | | **{s['ratio_peak_rss']:.2f}x** | "
                 f"{s['ratio_rss_growth']:.2f}x | | |")
    lines += ["", f"held-out: {HELD_OUT} pairs; all runs' steps/s: ours {s['sides']['ours']['all_steps_per_s']}, "
              f"TRL {s['sides']['trl']['all_steps_per_s']}"]
    for key in ("data_mismatches",):
        if key in s["sides"]["trl"]:
            lines[-1] += f"; TRL rows whose tokens differ from ours: {s['sides']['trl'][key]}"
    if min(r["cpu_share"] for r in s["sides"].values()) < 0.95:
        lines.append(BUSY_WARNING)
    return "\n".join(lines)


def common_arguments(description: str, size: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=size, choices=["100k", "1m", "10m"], help="llama size (lmcycle build)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--max-len", type=int, default=512, help="max tokens per sequence (and the context)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timed window")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side (ABBA order); the best counts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--examples", type=int, default=400, help="synthetic dialogues = pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=["hh", "synthetic"], default="hh" if HH_FILE.is_file() else "synthetic",
                        help="HH-RLHF pairs (default when the file is there) or synthetic dialogues")
    parser.add_argument("--no-group", action="store_true", help="ours: plainly shuffled batches, as TRL")
    parser.add_argument("--json", help="also write the summary to this JSON file")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser


def run_comparison(doc: str, script: str, run_ours: Callable, run_trl: Callable, prepare: Callable,
                   names: dict[str, str], what: str) -> None:
    """What each comparison script's ``__main__`` does: one side when called as a child, else both and a table."""
    parser = common_arguments(doc, size="10m")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.side:
        run_side(args.side, args.workdir, args, {"ours": run_ours, "trl": run_trl})
        return
    summary = run_both(script, args, CHILD_KEYS, lambda workdir: prepare(workdir, args))
    print(table(summary, names, what))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")


CHILD_KEYS = ("size", "batch", "max_len", "warmup", "steps", "threads", "lr", "examples", "seed", "data")


def length_facts(lengths: list[int]) -> dict:
    return {"mean_len": statistics.mean(lengths), "median_len": statistics.median(lengths),
            "max_len_seen": max(lengths)}
