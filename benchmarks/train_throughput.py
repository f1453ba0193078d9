"""Training throughput and peak memory: lmcycle's loop vs Hugging Face ``Trainer``, plus MFU.

    python benchmarks/train_throughput.py                       # llama-10m, 8 x 256 tokens, 5 + 30 steps
    python benchmarks/train_throughput.py --size 1m --json bench.json

Both sides train the *same* weights (built once with ``lmcycle.models.build.build_model``, saved with
``save_pretrained``, loaded by each side) on the *same* blocks in the same order (DialogSum dev dialogues
packed into ``seq_len`` blocks, or seeded random words without the shared data), with the same micro-batch,
fp32, AdamW (lr 3e-4, betas 0.9/0.95, eps 1e-8, no weight decay), constant learning rate, gradient clipping at
1.0, no eval, no logging, no checkpoint in the timed window. Each side runs in its own subprocess so that its
peak RSS is its own. As a check that both did the same work, each reports the loss of the trained model on two
held-out batches: the two must agree (up to float rounding).

Timing: the timed window runs from the start of optimizer step ``warmup`` to the start of step
``warmup + steps`` (each side runs ``warmup + steps + 1`` steps), so it holds exactly ``steps`` whole steps
(data, forward, backward, clipping, optimizer, per-step bookkeeping) and neither setup nor the final
checkpoint our loop writes after its last step. Ours: the time ``batch_at(step)`` is called; HF: the
``on_step_begin`` callback. ``tokens/s = steps * batch * seq_len / window``.

MFU = achieved FLOP/s / measured fp32 matmul peak (:mod:`matmul_peak`), where the FLOPs of one trained token are
``6 * N + 12 * L * d * T`` (PaLM, appendix B): ``N`` = weights of every ``nn.Linear`` including the tied output
projection (the input-embedding lookup does no FLOPs), ``L`` layers, ``d`` hidden size, ``T`` sequence length;
the second term is attention scores and values, forward and backward, counted without the causal half saved.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from measure import BUSY_WARNING, Clock, cpu_name, load_average, rss_mb, trainer_clock, version

HERE = Path(__file__).resolve().parent
DIALOGSUM_DEV = HERE.parent.parent / "shared" / "data" / "dialogsum" / "dialogsum.dev.jsonl"
ADAM = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
EVAL_BATCHES = 2


# -- shared setup (main process) ---------------------------------------------------------------------------


def corpus() -> tuple[list[str], str]:
    """Texts to train the tokenizer on and to pack, and a name for them (DialogSum dev, else seeded words)."""
    for path in (DIALOGSUM_DEV, DIALOGSUM_DEV.with_suffix(".jsonl.gz")):
        if path.is_file():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                return [json.loads(line)["dialogue"] for line in f if line.strip()], "DialogSum dev dialogues"
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    return [" ".join(rng.choice(words) for _ in range(200)) for _ in range(500)], "seeded random words"


def prepare(workdir: Path, size: str, seq_len: int, n_blocks: int) -> dict:
    """Save the model + tokenizer to ``workdir/model`` and ``n_blocks`` training blocks to ``workdir/blocks.pt``.

    The blocks ``[n_blocks, seq_len]`` are the packed corpus, repeated when it is shorter than ``n_blocks``.
    """
    from lmcycle.data.packing import pack_sequences
    from lmcycle.models.build import build_model, train_tokenizer

    texts, data_name = corpus()
    tokenizer = train_tokenizer(texts, 2048, seq2seq=False, max_len=max(seq_len, 512))
    model = build_model("llama", size, tokenizer, max(seq_len, 512), seed=0)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    packed = pack_sequences(ids, seq_len, tokenizer.eos_token_id)
    blocks = packed.repeat((n_blocks + len(packed) - 1) // len(packed), 1)[:n_blocks]
    torch.save(blocks.clone(), workdir / "blocks.pt")
    cfg = model.config
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"data": f"{data_name} ({len(packed)} distinct blocks)", "params": sum(p.numel() for p in model.parameters()),
            "linear_params": n_linear, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads, "ffn": cfg.intermediate_size, "vocab": cfg.vocab_size}


# -- one side (subprocess) ---------------------------------------------------------------------------------


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """Class and implementation of a torch optimizer, e.g. ``AdamW (fused)``; unwraps accelerate's wrapper."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    defaults = optimizer.defaults
    kind = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "for-loop"
    return f"{type(optimizer).__name__} ({kind})"


def run_ours(model, blocks: torch.Tensor, batch: int, total_steps: int, clock: Clock, out_dir: Path) -> str:
    from lmcycle.train.loop import TrainConfig, lm_loss_sum, make_optimizer, train

    def batch_at(step: int) -> list[dict[str, torch.Tensor]]:
        clock.step_starts(step)
        b = blocks[step * batch:(step + 1) * batch]
        return [{"input_ids": b, "labels": b}]

    cfg = TrainConfig(max_steps=total_steps, batch_size=batch, lr=ADAM["lr"], betas=ADAM["betas"],
                      weight_decay=ADAM["weight_decay"], min_lr_ratio=1.0, warmup_steps=0, max_grad_norm=1.0,
                      log_every=total_steps, save_every=0)
    train(model, batch_at, lm_loss_sum, cfg, out_dir, log=lambda **metrics: None)
    return optimizer_kind(make_optimizer(list(model.parameters()), cfg))  # what train() built (no state yet)


def run_hf(model, blocks: torch.Tensor, batch: int, total_steps: int, clock: Clock, out_dir: Path) -> str:
    from transformers import Trainer, TrainingArguments

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return total_steps * batch

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "labels": blocks[i]}

    args = TrainingArguments(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        eval_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=batch, max_steps=total_steps, torch_compile=False,
        train_sampling_strategy="sequential", learning_rate=ADAM["lr"], lr_scheduler_type="constant",
        warmup_steps=0, adam_beta1=ADAM["betas"][0], adam_beta2=ADAM["betas"][1], adam_epsilon=ADAM["eps"],
        weight_decay=ADAM["weight_decay"], max_grad_norm=1.0, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[trainer_clock(clock)])
    trainer.train()
    return optimizer_kind(trainer.optimizer)


def run_side(side: str, workdir: Path, batch: int, warmup: int, steps: int) -> dict:
    """Train one side; return its timing, memory and held-out loss (written to ``workdir/<side>.json``)."""
    from transformers import AutoModelForCausalLM

    from lmcycle.train.loop import mean_token_loss

    blocks = torch.load(workdir / "blocks.pt")
    total_steps = warmup + steps + 1
    held_out = [{"input_ids": b, "labels": b}
                for b in blocks[total_steps * batch:].split(batch)[:EVAL_BATCHES]]
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    if side == "hf":
        import transformers.trainer  # noqa: F401  (here, not in run_hf: "RSS growth in training" excludes imports)
    clock = Clock(warmup, steps)
    rss_before, load_before = rss_mb(), load_average()
    runner = {"ours": run_ours, "hf": run_hf}[side]
    out_dir = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=workdir))  # fresh: our loop would resume from it
    optimizer = runner(model, blocks, batch, total_steps, clock, out_dir)
    model.eval()
    result = {
        "side": side, "threads": torch.get_num_threads(), "optimizer": optimizer,
        "window_s": clock.window(), "tokens_per_s": steps * batch * blocks.shape[1] / clock.window(),
        "median_step_tokens_per_s": batch * blocks.shape[1] / clock.median_step(),
        "tokens_per_cpu_s": steps * batch * blocks.shape[1] / clock.cpu_window(),
        # ~1.0 when the process had its cores to itself (OpenMP threads spin rather than sleep while waiting);
        # well below 1, other work took the cores and the wall-clock numbers collapse (3-6x with one busy core).
        "cpu_share": clock.cpu_window() / (clock.window() * torch.get_num_threads()),
        "load_average": [load_before, load_average()],
        "rss_before_train_mb": rss_before, "peak_rss_mb": clock.peak_rss,
        "held_out_loss": mean_token_loss(model, held_out),
    }
    (workdir / f"{side}.json").write_text(json.dumps(result), encoding="utf-8")
    return result


# -- main: both sides, the table -----------------------------------------------------------------------------


def spawn_side(side: str, workdir: Path, args: argparse.Namespace) -> dict:
    """Run one side in a fresh interpreter (its own peak RSS; stderr captured, so no progress bar is drawn)."""
    cmd = [sys.executable, __file__, "--side", side, "--workdir", str(workdir), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{side} side failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads((workdir / f"{side}.json").read_text(encoding="utf-8"))


def flops_per_token(info: dict, seq_len: int) -> float:
    """Training FLOPs of one token: ``6 N + 12 L d T`` (see the module docstring)."""
    return 6 * info["linear_params"] + 12 * info["layers"] * info["hidden"] * seq_len


def summarise(info: dict, runs: dict[str, list[dict]], peak: dict, args: argparse.Namespace) -> dict:
    """Best run per side (highest tokens/s over the window), MFU against the fp32 peak, ratios ours / HF."""
    fpt = flops_per_token(info, args.seq_len)
    peak_flops = peak["fp32"]["peak_gflops"] * 1e9
    sides = {}
    for side, results in runs.items():
        best = max(results, key=lambda r: r["tokens_per_s"])
        sides[side] = {**best, "mfu": best["tokens_per_s"] * fpt / peak_flops,
                       "median_step_tokens_per_s": max(r["median_step_tokens_per_s"] for r in results),
                       "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in results],
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                       "load_average": [r["load_average"] for r in results]}
    ours, hf = sides["ours"], sides["hf"]
    return {
        "date": date.today().isoformat(), "size": f"llama-{args.size}", "model": info, "seq_len": args.seq_len,
        "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__,
        "transformers": version("transformers"), "python": platform.python_version(), "cpu": cpu_name(),
        "flops_per_token": fpt, "matmul_peak_gflops": {k: peak[k]["peak_gflops"] for k in ("fp32", "bf16")},
        "sides": sides, "ratio_tokens_per_s": ours["tokens_per_s"] / hf["tokens_per_s"],
        "ratio_median_step": ours["median_step_tokens_per_s"] / hf["median_step_tokens_per_s"],
        "ratio_peak_rss": ours["peak_rss_mb"] / hf["peak_rss_mb"],
        "held_out_loss_diff": abs(ours["held_out_loss"] - hf["held_out_loss"]),
    }


def table(s: dict) -> str:
    """The summary as a few header lines and a markdown table."""
    m, peak = s["model"], s["matmul_peak_gflops"]
    loads = [x for side in s["sides"].values() for pair in side["load_average"] for x in pair]
    lines = [
        f"{s['size']} ({m['params'] / 1e6:.2f}M params, {m['linear_params'] / 1e6:.2f}M in Linear layers; "
        f"L={m['layers']} d={m['hidden']} heads={m['heads']} ffn={m['ffn']} vocab={m['vocab']}), "
        f"batch {s['batch']} x {s['seq_len']} tokens, fp32, {s['warmup']} warmup + {s['steps']} timed steps, "
        f"best of {s['repeats']} runs per side; data: {m['data']}",
        f"{s['cpu']}, {s['cores']} cores, {s['threads']} torch threads, 1-min load average during the runs "
        f"{min(loads):.1f}-{max(loads):.1f}; torch {s['torch']}, transformers {s['transformers']}, "
        f"Python {s['python']}",
        f"measured matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s; "
        f"FLOPs/token = 6N + 12LdT = {s['flops_per_token'] / 1e6:.1f} M",
        "",
        "| loop | tokens/s | tokens/s (median step) | MFU (fp32) | CPU share | peak RSS (MiB) "
        "| RSS growth in training (MiB) | held-out loss after | optimizer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"ours": "lmcycle `train()`", "hf": "HF `Trainer`"}
    for side in ("ours", "hf"):
        r = s["sides"][side]
        lines.append(f"| {names[side]} | {r['tokens_per_s']:.0f} | {r['median_step_tokens_per_s']:.0f} | "
                     f"{100 * r['mfu']:.1f}% | {r['cpu_share']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] - r['rss_before_train_mb']:.0f} "
                     f"| {r['held_out_loss']:.4f} | {r['optimizer']} |")
    lines.append(f"| **ours / HF** | **{s['ratio_tokens_per_s']:.2f}x** | {s['ratio_median_step']:.2f}x | | | "
                 f"**{s['ratio_peak_rss']:.2f}x** | | diff {s['held_out_loss_diff']:.1e} | |")
    if min(r["cpu_share"] for r in s["sides"].values()) < 0.95:
        lines.append(BUSY_WARNING)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="10m", choices=["1m", "10m"], help="llama size from lmcycle.models.build")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="runs per side (ABBA order); the best counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default, all cores)")
    parser.add_argument("--json", help="also write the summary to this JSON file")
    parser.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side:
        run_side(args.side, args.workdir, args.batch, args.warmup, args.steps)
        return

    sys.path.insert(0, str(HERE))
    from matmul_peak import measure_peak

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmcycle-bench-") as tmp:
        workdir = Path(tmp)
        n_blocks = (args.warmup + args.steps + 1 + EVAL_BATCHES) * args.batch
        info = prepare(workdir, args.size, args.seq_len, n_blocks)
        peaks = [measure_peak(("fp32", "bf16"), (1024, 1536, 2048), repeats=5)]
        runs: dict[str, list[dict]] = {"ours": [], "hf": []}
        # ABBA order (ours, hf, hf, ours, ...) so that a drift in the machine's load favours neither side.
        order = [side for r in range(args.repeats) for side in (("ours", "hf") if r % 2 == 0 else ("hf", "ours"))]
        for side in order:
            runs[side].append(spawn_side(side, workdir, args))
            r = runs[side][-1]
            print(f"{side}: {r['tokens_per_s']:.0f} tokens/s ({r['median_step_tokens_per_s']:.0f} by median step), "
                  f"CPU share {r['cpu_share']:.2f}, load {r['load_average'][0]:.1f}-{r['load_average'][1]:.1f}",
                  file=sys.stderr)
        peaks.append(measure_peak(("fp32", "bf16"), (1024, 1536, 2048), repeats=5))
    # The peak is the best the machine did, before or after the runs (the machine is shared).
    peak = {k: max(peaks, key=lambda p: p[k]["peak_gflops"])[k] for k in ("fp32", "bf16")}
    summary = summarise(info, runs, peak, args)
    summary["benchmark_wall_s"] = round(time.perf_counter() - started, 1)
    print(table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
