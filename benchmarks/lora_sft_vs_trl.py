"""LoRA fine-tuning throughput and peak memory: lmcycle's SFT code path vs PEFT + TRL ``SFTTrainer``.

    python benchmarks/lora_sft_vs_trl.py                    # llama-10m, batch 8, max_len 512, 4 + 60 steps, 2 threads
    python benchmarks/lora_sft_vs_trl.py --size 1m --warmup 2 --steps 10 --repeats 1   # a quick check
    python benchmarks/lora_sft_vs_trl.py --json lora-sft-10m.json

Both sides fine-tune the *same* model (an lmcycle-built llama with a tokenizer trained on the built-in synthetic
dialogues, saved with ``save_pretrained``) with the *same* LoRA adapter (rank, alpha, q_proj/v_proj, no dropout;
its initial A is made once by ``add_lora`` after ``seed_everything`` as ``run_sft`` does, and saved in PEFT
format: ours re-creates it the same way, TRL gets it through ``PeftModel.from_pretrained``), on the *same*
prompt/completion pairs (synthetic dialogues rendered with the ``summarize`` template: the prompt is
``template.render(ex, [])``, the completion ``template.render_target(ex)``) in the *same* order (the batches of
``micro_batch_indices``, the order ``run_sft`` uses; TRL gets the pairs in that order and a sequential sampler),
with the same per-device batch, fp32, AdamW (fused, lr 3e-4, betas 0.9/0.95, eps 1e-8, no weight decay),
constant learning rate, gradient clipping at 1.0 and a log line every step. Loss on the completion (+ EOS) only
on both sides: ours through ``encode_sft``'s -100 labels, TRL because the dataset has ``prompt``/``completion``
columns and ``completion_only_loss=True``. TRL-side settings that differ from its defaults and would otherwise
make the comparison unfair: ``gradient_checkpointing=False`` (TRL turns it on by default), ``bf16=False`` (TRL's
default is bf16 autocast), ``use_cpu=True``, ``packing=False``, no eval, no saving, ``report_to=[]``. TRL computes
the loss with its fused (chunked) LM head; that is part of what is measured. The TRL child checks that its
tokenized dataset equals ours row by row (``data_mismatches`` must be 0).

Ours: ``lmcycle.stages.sft`` pieces — ``encode_sft``, ``collate_sft`` and ``micro_batch_indices`` in ``batch_at``,
``add_lora``, ``lm_loss_sum`` and ``lmcycle.train.loop.train``, exactly as ``run_sft`` wires them (without the
run directory and report machinery).

Each side runs in its own subprocess with ``--threads`` torch threads (default 2), ``--repeats`` times in ABBA
order; the run with the best tokens/s counts. Timing: the window runs from the start of optimizer step
``warmup`` to the start of step ``warmup + steps`` (``warmup + steps + 1`` steps run), ours from the call of
``batch_at(step)``, TRL from ``on_step_begin``. Tokens are counted the same way for both, from the batches
themselves: *target tokens* (the completion tokens the loss covers) and *padded tokens* (batch x longest row).

Memory: ``ru_maxrss`` of the child (``getrusage(RUSAGE_SELF)``) at the start of the last step (so neither our
final checkpoint nor TRL's end-of-training work counts), ``RSS before`` the resident memory right before
``train()`` / ``trainer.train()``, and the growth between the two. Our ``train()`` resets the kernel's
high-water mark when it starts (``reset_peak_rss``), which can also lower ``ru_maxrss``; so the peak reported is
the larger of ``ru_maxrss`` before training and at the start of the last step, for both sides.

Loss curves: the per-step losses of both sides, averaged over windows of ``--loss-window`` steps; the report
gives both lists and the largest absolute difference of the windowed means (same data, same initial adapter,
same optimizer: it should be float noise).
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
from datetime import date
from pathlib import Path

import torch
from measure import BUSY_WARNING, Clock, cpu_name, load_average, peak_rss_mb, rss_mb, trainer_clock, version

ADAM = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
TEMPLATE = "summarize"
NAMES = {"ours": "lmcycle `train()` + `add_lora`", "trl": "TRL `SFTTrainer` + PEFT"}


# -- shared setup (main process and children) --------------------------------------------------------------


def examples(n: int, seed: int) -> list:
    from lmcycle.data.synthetic import synthetic_dialogues

    return synthetic_dialogues(n, seed)


def lora_config(args: argparse.Namespace):
    from lmcycle.adapt.lora import LoraConfig

    return LoraConfig(r=args.rank, alpha=args.alpha, dropout=0.0, target_modules=["q_proj", "v_proj"])


def encoded_items(args: argparse.Namespace, tokenizer) -> list[dict]:
    """Our SFT items of the benchmark's examples, exactly as ``run_sft`` encodes them."""
    from lmcycle.data.sft import encode_sft
    from lmcycle.data.templates import get_template

    return encode_sft(examples(args.examples, args.seed), get_template(TEMPLATE), tokenizer, args.max_len, False)


def step_order(n_items: int, args: argparse.Namespace) -> list[list[int]]:
    """The item indices of every optimizer step (``run_sft``'s ``micro_batch_indices``, one micro-batch)."""
    from lmcycle.train.loop import micro_batch_indices

    total = args.warmup + args.steps + 1
    return [micro_batch_indices(n_items, s, args.batch, 1, args.seed)[0] for s in range(total)]


def prepare(workdir: Path, args: argparse.Namespace) -> dict:
    """Tokenizer + model to ``workdir/model``, the seeded initial adapter to ``workdir/adapter``; token counts."""
    from lmcycle.adapt.lora import add_lora, count_trainable, save_lora
    from lmcycle.data.sft import collate_sft
    from lmcycle.models.build import build_model, train_tokenizer
    from lmcycle.train.loop import seed_everything

    exs = examples(args.examples, args.seed)
    texts = [t for ex in exs for t in (ex.input, *ex.targets)]
    tokenizer = train_tokenizer(texts, 2048, seq2seq=False, max_len=args.max_len)
    model = build_model("llama", args.size, tokenizer, args.max_len, seed=0)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    params = sum(p.numel() for p in model.parameters())
    seed_everything(args.seed)  # as run_sft's add_lora_for_training: A's random init is part of the run
    add_lora(model, lora_config(args))
    trainable, _ = count_trainable(model)
    save_lora(model, "default", workdir / "adapter", base_model_name_or_path=str(workdir / "model"))

    items = encoded_items(args, tokenizer)
    target, padded = [], []
    for idx in step_order(len(items), args):
        batch = collate_sft([items[i] for i in idx], tokenizer.pad_token_id)
        target.append(int((batch["labels"][:, 1:] != -100).sum()))  # predicted positions: labels shifted by one
        padded.append(batch["input_ids"].numel())
    cfg = model.config
    lengths = [len(it["input_ids"]) for it in items]
    return {"params": params, "lora_params": trainable, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "vocab": cfg.vocab_size, "examples": len(items), "mean_len": statistics.mean(lengths),
            "max_len_seen": max(lengths), "target_tokens": target, "padded_tokens": padded}


# -- one side (subprocess) ---------------------------------------------------------------------------------


def run_ours(workdir: Path, args: argparse.Namespace, clock: Clock, out_dir: Path) -> tuple[list[float], dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmcycle.adapt.lora import add_lora
    from lmcycle.data.sft import collate_sft
    from lmcycle.train.loop import TrainConfig, lm_loss_sum, micro_batch_indices, seed_everything, train

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    items = encoded_items(args, tokenizer)
    pad_id = tokenizer.pad_token_id
    total = args.warmup + args.steps + 1

    def batch_at(step: int):  # run_sft's batch_at, plus the clock
        clock.step_starts(step)
        return [collate_sft([items[i] for i in idx], pad_id)
                for idx in micro_batch_indices(len(items), step, args.batch, 1, args.seed)]

    seed_everything(args.seed)
    add_lora(model, lora_config(args))
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(max_steps=total, batch_size=args.batch, lr=ADAM["lr"], betas=ADAM["betas"],
                      weight_decay=ADAM["weight_decay"], min_lr_ratio=1.0, warmup_steps=0, max_grad_norm=1.0,
                      log_every=1, save_every=0)
    mem = {"rss_before_train_mb": rss_mb(), "maxrss_before_train_mb": peak_rss_mb()}
    result = train(model, batch_at, lm_loss_sum, cfg, out_dir, log=lambda **metrics: None, params=params,
                   desc="ours")
    return result.losses, mem


def run_trl(workdir: Path, args: argparse.Namespace, clock: Clock, out_dir: Path) -> tuple[list[float], dict]:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lmcycle.data.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    base = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, workdir / "adapter", is_trainable=True)
    exs = examples(args.examples, args.seed)
    template = get_template(TEMPLATE)
    rows = [exs[i] for idx in step_order(len(exs), args) for i in idx]
    data = Dataset.from_dict({"prompt": [template.render(ex, []) for ex in rows],
                              "completion": [template.render_target(ex) for ex in rows]})
    losses: list[float] = []

    config = SFTConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        eval_strategy="no", logging_strategy="steps", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps + 1, train_sampling_strategy="sequential", shuffle_dataset=False,
        learning_rate=ADAM["lr"], lr_scheduler_type="constant", warmup_steps=0, adam_beta1=ADAM["betas"][0],
        adam_beta2=ADAM["betas"][1], adam_epsilon=ADAM["eps"], weight_decay=ADAM["weight_decay"],
        optim="adamw_torch_fused", max_grad_norm=1.0, seed=args.seed, gradient_checkpointing=False,
        packing=False, max_length=args.max_len, completion_only_loss=True, torch_compile=False,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[trainer_clock(clock, losses)])
    mem = {"rss_before_train_mb": rss_mb(), "maxrss_before_train_mb": peak_rss_mb()}
    trainer.train()
    # Same tokens and labels as ours, row by row? (checked after the measurement, so it costs nothing there)
    ours = encoded_items(args, tokenizer)
    flat = [ours[i] for idx in step_order(len(ours), args) for i in idx]
    mismatches = sum(1 for mine, theirs in zip(flat, trainer.train_dataset, strict=True)
                     if mine["input_ids"] != theirs["input_ids"] or mine["labels"] != theirs["labels"])
    mem["data_mismatches"] = mismatches
    mem["completion_only_loss"] = bool(trainer.completion_only_loss)
    return losses, mem


def run_side(side: str, workdir: Path, args: argparse.Namespace) -> dict:
    """Fine-tune on one side; return its timing, memory and losses (also written to ``workdir/<side>.json``)."""
    clock = Clock(args.warmup, args.steps)
    load_before = load_average()
    out_dir = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=workdir))  # fresh: our loop would resume from it
    losses, mem = {"ours": run_ours, "trl": run_trl}[side](workdir, args, clock, out_dir)
    info = json.loads((workdir / "info.json").read_text(encoding="utf-8"))
    timed = range(args.warmup, args.warmup + args.steps)
    target = sum(info["target_tokens"][s] for s in timed)
    padded = sum(info["padded_tokens"][s] for s in timed)
    peak = max(clock.peak_rss, mem["maxrss_before_train_mb"])
    result = {
        "side": side, "threads": torch.get_num_threads(), "window_s": clock.window(),
        "tokens_per_s": target / clock.window(), "padded_tokens_per_s": padded / clock.window(),
        "median_step_s": clock.median_step(), "tokens_per_cpu_s": target / clock.cpu_window(),
        "cpu_share": clock.cpu_window() / (clock.window() * torch.get_num_threads()),
        "load_average": [load_before, load_average()], "peak_rss_mb": peak,
        "rss_growth_mb": peak - mem["rss_before_train_mb"], "losses": losses, **mem,
    }
    (workdir / f"{side}.json").write_text(json.dumps(result), encoding="utf-8")
    return result


# -- main: both sides, the table -----------------------------------------------------------------------------


def child_args(args: argparse.Namespace) -> list[str]:
    keys = ("size", "batch", "max_len", "warmup", "steps", "threads", "rank", "alpha", "examples", "seed")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def spawn_side(side: str, workdir: Path, args: argparse.Namespace) -> dict:
    """Run one side in a fresh interpreter (its own peak RSS; output captured, so no progress bar is drawn)."""
    cmd = [sys.executable, __file__, "--side", side, "--workdir", str(workdir), *child_args(args)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{side} side failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads((workdir / f"{side}.json").read_text(encoding="utf-8"))


def windowed(losses: list[float], window: int) -> list[float]:
    """Means of consecutive ``window``-step chunks (the last chunk may be shorter)."""
    return [statistics.mean(losses[i:i + window]) for i in range(0, len(losses), window)]


def summarise(info: dict, runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    sides = {}
    for side, results in runs.items():
        best = max(results, key=lambda r: r["tokens_per_s"])
        sides[side] = {**best, "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in results],
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                       "rss_growth_mb": max(r["rss_growth_mb"] for r in results),
                       "windowed_loss": windowed(results[0]["losses"], args.loss_window),
                       "final_loss": windowed(results[0]["losses"], args.loss_window)[-1]}
    ours, trl = sides["ours"], sides["trl"]
    n = min(len(ours["losses"]), len(trl["losses"]))
    return {
        "date": date.today().isoformat(), "size": f"llama-{args.size}",
        "model": {k: v for k, v in info.items() if k not in ("target_tokens", "padded_tokens")},
        "batch": args.batch, "max_len": args.max_len, "warmup": args.warmup, "steps": args.steps,
        "repeats": args.repeats, "lora": {"r": args.rank, "alpha": args.alpha, "targets": ["q_proj", "v_proj"]},
        "loss_window": args.loss_window, "threads": args.threads, "cores": os.cpu_count(),
        "torch": torch.__version__, "transformers": version("transformers"), "peft": version("peft"),
        "trl": version("trl"), "python": platform.python_version(), "cpu": cpu_name(), "sides": sides,
        "ratio_tokens_per_s": ours["tokens_per_s"] / trl["tokens_per_s"],
        "ratio_peak_rss": ours["peak_rss_mb"] / trl["peak_rss_mb"],
        "ratio_rss_growth": ours["rss_growth_mb"] / max(trl["rss_growth_mb"], 1e-9),
        "max_abs_windowed_loss_diff": max(abs(a - b) for a, b in zip(ours["windowed_loss"], trl["windowed_loss"],
                                                                      strict=False)),
        "max_abs_step_loss_diff": max(abs(a - b) for a, b in zip(ours["losses"][:n], trl["losses"][:n],
                                                                 strict=True)),
    }


def table(s: dict) -> str:
    m = s["model"]
    loads = [x for side in s["sides"].values() for x in side["load_average"]]
    lines = [
        f"{s['size']} ({m['params'] / 1e6:.2f}M params, LoRA r={s['lora']['r']} alpha={s['lora']['alpha']} on "
        f"q_proj/v_proj: {m['lora_params']} trainable), batch {s['batch']}, max_len {s['max_len']} "
        f"(synthetic dialogues, summarize template: {m['examples']} examples, mean {m['mean_len']:.0f} / max "
        f"{m['max_len_seen']} tokens), fp32, {s['warmup']} warmup + {s['steps']} timed steps, best of "
        f"{s['repeats']} runs per side",
        f"{s['cpu']}, {s['cores']} cores, {s['threads']} torch threads, 1-min load average "
        f"{min(loads):.1f}-{max(loads):.1f}; torch {s['torch']}, transformers {s['transformers']}, "
        f"peft {s['peft']}, trl {s['trl']}, Python {s['python']}",
        "",
        "| framework | target tokens/s | padded tokens/s | CPU share | peak RSS (MiB) | RSS growth in training (MiB) "
        f"| final loss (last {s['loss_window']}-step mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in ("ours", "trl"):
        r = s["sides"][side]
        lines.append(f"| {NAMES[side]} | {r['tokens_per_s']:.0f} | {r['padded_tokens_per_s']:.0f} | "
                     f"{r['cpu_share']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} | "
                     f"{r['final_loss']:.4f} |")
    lines.append(f"| **ours / TRL** | **{s['ratio_tokens_per_s']:.2f}x** | | | **{s['ratio_peak_rss']:.2f}x** | "
                 f"{s['ratio_rss_growth']:.2f}x | |")
    fmt = ", ".join
    lines += [
        "",
        f"loss, {s['loss_window']}-step means: ours [{fmt(f'{x:.4f}' for x in s['sides']['ours']['windowed_loss'])}]",
        f"                          TRL  [{fmt(f'{x:.4f}' for x in s['sides']['trl']['windowed_loss'])}]",
        f"max |diff| of windowed means {s['max_abs_windowed_loss_diff']:.2e}, of single steps "
        f"{s['max_abs_step_loss_diff']:.2e}; TRL data rows differing from ours: "
        f"{s['sides']['trl']['data_mismatches']} (completion_only_loss={s['sides']['trl']['completion_only_loss']})",
    ]
    if min(r["cpu_share"] for r in s["sides"].values()) < 0.95:
        lines.append(BUSY_WARNING)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="10m", choices=["100k", "1m", "10m"], help="llama size (lmcycle build)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512, help="max tokens per example (and the context)")
    parser.add_argument("--warmup", type=int, default=4, help="steps before the timed window")
    parser.add_argument("--steps", type=int, default=60, help="timed steps")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side (ABBA order); the best counts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    parser.add_argument("--examples", type=int, default=2000, help="synthetic dialogues in the training set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-window", type=int, default=10, help="steps per windowed loss mean")
    parser.add_argument("--json", help="also write the summary to this JSON file")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.side:
        run_side(args.side, args.workdir, args)
        return

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmcycle-lora-bench-") as tmp:
        workdir = Path(tmp)
        info = prepare(workdir, args)
        (workdir / "info.json").write_text(json.dumps(info), encoding="utf-8")
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        order = [side for r in range(args.repeats) for side in (("ours", "trl") if r % 2 == 0 else ("trl", "ours"))]
        for side in order:
            runs[side].append(spawn_side(side, workdir, args))
            r = runs[side][-1]
            print(f"{side}: {r['tokens_per_s']:.0f} target tokens/s ({r['padded_tokens_per_s']:.0f} padded), "
                  f"CPU share {r['cpu_share']:.2f}, peak RSS {r['peak_rss_mb']:.0f} MiB", file=sys.stderr)
    summary = summarise(info, runs, args)
    summary["benchmark_wall_s"] = round(time.perf_counter() - started, 1)
    print(table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
