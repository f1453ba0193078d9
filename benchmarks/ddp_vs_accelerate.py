"""Data-parallel LoRA SFT on 2 processes: lmcycle's ``ddp`` engine vs Hugging Face ``Trainer`` + accelerate (+ PEFT).

    python benchmarks/ddp_vs_accelerate.py                          # llama-10m, 2 ranks x batch 8 x 256, 4 + 30 steps
    python benchmarks/ddp_vs_accelerate.py --steps 5 --warmup 1     # a quick check
    python benchmarks/ddp_vs_accelerate.py --repeats 2 --json ddp-vs-accelerate.json   # ABBA

Both sides run under ``torchrun --standalone --nproc_per_node 2`` (gloo, ``OMP_NUM_THREADS=1`` per rank, so 2
ranks = 2 cores): ours is ``lmcycle.train.loop.train`` with ``distributed.strategy: ddp`` (torch DDP around the
loss, ``gradient_as_bucket_view``, ``no_sync`` for accumulation); HF's is ``transformers.Trainer``, which under
torchrun prepares the model with accelerate's DDP (``use_cpu=True, ddp_backend="gloo"``).

Same work on both sides:

- the *same* model: an lmcycle-shaped llama (``--size``, random weights seeded once, saved with
  ``save_pretrained``, vocabulary ``--vocab``), fp32 (``bf16`` off on both sides);
- the *same* LoRA adapter: ``add_lora`` (r, alpha = 2r, no dropout, ``--targets``) after ``seed_everything`` as
  ``run_sft`` does, saved once in PEFT's format (``save_lora``); ours re-creates it the same way (checked against
  the saved file: ``adapter_init_max_diff`` must be 0), HF loads it with ``PeftModel.from_pretrained(...,
  is_trainable=True)``;
- the *same* data in the same places: seeded random token blocks ``[n, seq_len]`` (every position a label);
  step ``s`` of rank ``r`` takes blocks ``(s * world + r) * batch ...``: what accelerate's ``BatchSamplerShard``
  gives rank ``r`` from a sequential sampler, and what ours' ``batch_at`` returns. Each rank records a checksum
  of every batch it trained on, and the two sides' checksums must be equal (``data_mismatches`` 0);
- the same optimizer: fused AdamW, lr 3e-4, betas 0.9/0.95, eps 1e-8, no weight decay, constant lr, clipping at
  1.0; one micro-batch per step; the loss is the token mean over both ranks on both sides;
- HF-side settings that would otherwise differ from ours: ``ddp_find_unused_parameters=False`` (the Trainer turns
  it on for a ``PeftModel``: a graph traversal per step; ``--hf-find-unused`` keeps the Trainer's choice),
  ``gradient_checkpointing=False``, no eval, no saving, ``report_to=[]``, ``dataloader_num_workers=0``.

Timing: the window runs from the start of optimizer step ``warmup`` to the start of step ``warmup + steps``
(ours: the call of ``batch_at``; HF: ``on_step_begin``), on rank 0; tokens/s = ``steps x batch x seq_len x
world / window``. Memory per rank: the larger of ``ru_maxrss`` before training and at the start of the last
step (our ``train()`` resets the kernel's high-water mark when it starts). Each side is one ``torchrun``, run
``--repeats`` times in ABBA order; the best tokens/s counts. Correctness: both sides log the global mean loss of
every step (``max_abs_step_loss_diff``), and rank 0 evaluates the trained model on held-out blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import BUSY_WARNING, Clock, cpu_name, load_average, peak_rss_mb, rss_mb, trainer_clock, version  # noqa: E402,I001

ADAM = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
NAMES = {"ours": "lmcycle `train()` (ddp engine)", "hf": "HF `Trainer` + accelerate DDP + PEFT"}
EVAL_BLOCKS = 16


def model_config(args: argparse.Namespace):
    from lmcycle.train.memory_plan import config_for_size

    cfg = config_for_size("llama", args.size, vocab=args.vocab, max_len=max(args.seq_len, 512))
    cfg._attn_implementation = "sdpa"
    return cfg


def lora_config(args: argparse.Namespace):
    from lmcycle.adapt.lora import LoraConfig

    return LoraConfig(r=args.lora_rank, alpha=2 * args.lora_rank, dropout=0.0, target_modules=args.targets.split(","))


def n_blocks(args: argparse.Namespace) -> int:
    return (args.warmup + args.steps + 1) * args.batch * args.ranks + EVAL_BLOCKS


def prepare(workdir: Path, args: argparse.Namespace) -> dict:
    """The model, the seeded initial adapter and the token blocks, saved for both sides."""
    import torch
    from transformers import LlamaForCausalLM

    from lmcycle.adapt.lora import add_lora, count_trainable, save_lora
    from lmcycle.train.loop import seed_everything

    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(args))
    model.save_pretrained(workdir / "model")
    params = sum(p.numel() for p in model.parameters())
    seed_everything(args.seed)
    add_lora(model, lora_config(args))
    trainable, _ = count_trainable(model)
    save_lora(model, "default", workdir / "adapter", base_model_name_or_path=str(workdir / "model"))
    gen = torch.Generator().manual_seed(args.seed + 1)
    torch.save(torch.randint(0, args.vocab, (n_blocks(args), args.seq_len), generator=gen), workdir / "blocks.pt")
    cfg = model.config
    return {"params": params, "lora_params": trainable, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads, "ffn": cfg.intermediate_size, "vocab": cfg.vocab_size}


# -- one rank of one side (under torchrun) --------------------------------------------------------------------------


def rank_rows(step: int, rank: int, world: int, batch: int) -> slice:
    start = (step * world + rank) * batch
    return slice(start, start + batch)


def checksum(ids) -> int:
    return int((ids.long() * (1 + ids.new_tensor(range(ids.numel())).view_as(ids).long() % 7919)).sum())


def run_ours(workdir: Path, args: argparse.Namespace, clock: Clock, out_dir: Path, blocks, seen: list) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lmcycle.adapt.adapters import read_adapter
    from lmcycle.adapt.lora import add_lora, lora_state_dict
    from lmcycle.train.distributed import init_distributed
    from lmcycle.train.engines import DistributedConfig
    from lmcycle.train.loop import TrainConfig, lm_loss_sum, seed_everything, train

    me, world = init_distributed()
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    seed_everything(args.seed)  # as run_sft: the adapter's init is part of the run
    add_lora(model, lora_config(args))
    saved = read_adapter(workdir / "adapter", "LORA")[1] if me == 0 else {}
    ours = lora_state_dict(model, "default")
    init_diff = max((float((ours[k] - v).abs().max()) for k, v in saved.items()), default=0.0)
    total = args.warmup + args.steps + 1

    def batch_at(step: int):
        clock.step_starts(step)
        ids = blocks[rank_rows(step, me, world, args.batch)]
        seen.append(checksum(ids))
        return [{"input_ids": ids, "labels": ids}]

    losses: list[float] = []
    cfg = TrainConfig(max_steps=total, batch_size=args.batch, lr=ADAM["lr"], betas=ADAM["betas"],
                      weight_decay=ADAM["weight_decay"], min_lr_ratio=1.0, warmup_steps=0, max_grad_norm=1.0,
                      log_every=1, save_every=0, spike_factor=None, distributed=DistributedConfig(strategy="ddp"))
    mem = {"rss_before_train_mb": rss_mb(), "maxrss_before_train_mb": peak_rss_mb()}
    train(model, batch_at, lm_loss_sum, cfg, out_dir, log=lambda **m: losses.append(m["loss"]) if "loss" in m else None,
          params=[p for p in model.parameters() if p.requires_grad], desc="ours")
    return {**mem, "losses": losses, "model": model, "rank": me, "world": world, "adapter_init_max_diff": init_diff}


def run_hf(workdir: Path, args: argparse.Namespace, clock: Clock, out_dir: Path, blocks, seen: list) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    total = args.warmup + args.steps + 1
    world = int(os.environ.get("WORLD_SIZE", "1"))

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return total * args.batch * world

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "labels": blocks[i]}

    def collate(rows):
        ids = torch.stack([r["input_ids"] for r in rows])
        seen.append(checksum(ids))
        return {"input_ids": ids, "labels": ids.clone()}

    base = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, workdir / "adapter", is_trainable=True)
    losses: list[float] = []
    targs = TrainingArguments(
        output_dir=str(out_dir), use_cpu=True, ddp_backend="gloo", bf16=False, fp16=False, report_to=[],
        save_strategy="no", eval_strategy="no", logging_strategy="steps", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=total, train_sampling_strategy="sequential", learning_rate=ADAM["lr"],
        lr_scheduler_type="constant", warmup_steps=0, adam_beta1=ADAM["betas"][0], adam_beta2=ADAM["betas"][1],
        adam_epsilon=ADAM["eps"], weight_decay=ADAM["weight_decay"], optim="adamw_torch_fused", max_grad_norm=1.0,
        seed=args.seed, gradient_checkpointing=False, torch_compile=False, remove_unused_columns=False,
        **({} if args.hf_find_unused else {"ddp_find_unused_parameters": False}),
    )
    trainer = Trainer(model=model, args=targs, train_dataset=Blocks(), data_collator=collate,
                      callbacks=[trainer_clock(clock, losses)])
    mem = {"rss_before_train_mb": rss_mb(), "maxrss_before_train_mb": peak_rss_mb()}
    trainer.train()
    import torch.distributed as dist

    return {**mem, "losses": losses, "model": trainer.model, "rank": dist.get_rank(), "world": dist.get_world_size(),
            "ddp_find_unused_parameters": targs.ddp_find_unused_parameters}


def run_side(side: str, workdir: Path, args: argparse.Namespace, tag: str) -> None:
    import torch

    from lmcycle.train.loop import mean_token_loss

    torch.set_num_threads(args.threads)
    blocks = torch.load(workdir / "blocks.pt")
    clock = Clock(args.warmup, args.steps)
    load_before = load_average()
    out_dir = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=workdir))
    seen: list[int] = []
    res = {"ours": run_ours, "hf": run_hf}[side](workdir, args, clock, out_dir, blocks, seen)
    model = res.pop("model")
    held_out = None
    if res["rank"] == 0:
        model.eval()
        tail = blocks[-EVAL_BLOCKS:]
        held_out = mean_token_loss(model, [{"input_ids": b, "labels": b} for b in tail.split(args.batch)])
    world = res["world"]
    tokens = args.steps * args.batch * args.seq_len * world
    peak = max(clock.peak_rss, res["maxrss_before_train_mb"])
    result = {
        "side": side, "threads": torch.get_num_threads(), "window_s": clock.window(), "tokens_per_s": tokens / clock.window(),
        "median_step_s": clock.median_step(), "tokens_per_cpu_s": tokens / world / clock.cpu_window(),
        "cpu_share": clock.cpu_window() / (clock.window() * torch.get_num_threads()),
        "load_average": [load_before, load_average()], "peak_rss_mb": peak,
        "rss_growth_mb": peak - res["rss_before_train_mb"], "held_out_loss": held_out,
        "batches_seen": seen[:args.warmup + args.steps + 1], **res,
    }
    (workdir / f"{tag}-rank{res['rank']}.json").write_text(json.dumps(result), encoding="utf-8")


# -- main: both sides, the table ---------------------------------------------------------------------------------


def child_args(args: argparse.Namespace) -> list[str]:
    keys = ("size", "vocab", "batch", "seq_len", "warmup", "steps", "threads", "lora_rank", "targets", "seed", "ranks")
    out = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    return out + (["--hf-find-unused"] if args.hf_find_unused else [])


def spawn_side(side: str, workdir: Path, args: argparse.Namespace, tag: str) -> list[dict]:
    """One torchrun of ``side`` over ``args.ranks`` ranks; every rank's result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
           __file__, "--side", side, "--workdir", str(workdir), "--tag", tag, *child_args(args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{side} side failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return [json.loads((workdir / f"{tag}-rank{r}.json").read_text(encoding="utf-8")) for r in range(args.ranks)]


def summarise(info: dict, runs: dict[str, list[list[dict]]], args: argparse.Namespace) -> dict:
    sides = {}
    for side, launches in runs.items():
        best = max(launches, key=lambda ranks: ranks[0]["tokens_per_s"])
        sides[side] = {
            "ranks": best, "tokens_per_s": best[0]["tokens_per_s"],
            "all_tokens_per_s": [round(ranks[0]["tokens_per_s"], 1) for ranks in launches],
            "peak_rss_mb": [max(ranks[r]["peak_rss_mb"] for ranks in launches) for r in range(args.ranks)],
            "rss_growth_mb": [max(ranks[r]["rss_growth_mb"] for ranks in launches) for r in range(args.ranks)],
            "losses": best[0]["losses"], "held_out_loss": best[0]["held_out_loss"],
        }
    ours, hf = sides["ours"], sides["hf"]
    n = min(len(ours["losses"]), len(hf["losses"]))
    mismatches = sum(a != b for r in range(args.ranks)
                     for a, b in zip(ours["ranks"][r]["batches_seen"], hf["ranks"][r]["batches_seen"], strict=True))
    return {
        "date": date.today().isoformat(), "size": f"llama-{args.size}", "model": info, "batch": args.batch,
        "seq_len": args.seq_len, "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
        "ranks": args.ranks, "threads_per_rank": args.threads,
        "lora": {"r": args.lora_rank, "alpha": 2 * args.lora_rank, "targets": args.targets.split(",")},
        "cores": os.cpu_count(), "torch": version("torch"), "transformers": version("transformers"),
        "accelerate": version("accelerate"), "peft": version("peft"), "python": platform.python_version(),
        "cpu": cpu_name(), "sides": sides,
        "ratio_tokens_per_s": ours["tokens_per_s"] / hf["tokens_per_s"],
        "ratio_tokens_per_cpu_s": ours["ranks"][0]["tokens_per_cpu_s"] / hf["ranks"][0]["tokens_per_cpu_s"],
        "ratio_peak_rss": [a / b for a, b in zip(ours["peak_rss_mb"], hf["peak_rss_mb"], strict=True)],
        "ratio_rss_growth": [a / max(b, 1e-9) for a, b in zip(ours["rss_growth_mb"], hf["rss_growth_mb"], strict=True)],
        "max_abs_step_loss_diff": max(abs(a - b) for a, b in zip(ours["losses"][:n], hf["losses"][:n], strict=True)),
        "held_out_loss_diff": abs(ours["held_out_loss"] - hf["held_out_loss"]),
        "data_mismatches": mismatches, "adapter_init_max_diff": ours["ranks"][0]["adapter_init_max_diff"],
        "hf_ddp_find_unused_parameters": hf["ranks"][0].get("ddp_find_unused_parameters"),
    }


def table(s: dict) -> str:
    m = s["model"]
    loads = [x for side in s["sides"].values() for r in side["ranks"] for x in r["load_average"]]
    lines = [
        f"{s['size']} ({m['params'] / 1e6:.2f}M params, L={m['layers']} d={m['hidden']} vocab={m['vocab']}; LoRA "
        f"r={s['lora']['r']} alpha={s['lora']['alpha']} on {'/'.join(s['lora']['targets'])}: {m['lora_params']:,} "
        f"trainable), fp32, {s['ranks']} ranks x batch {s['batch']} x {s['seq_len']} tokens, {s['warmup']} warm-up "
        f"+ {s['steps']} timed steps, best of {s['repeats']} launches per side",
        f"{s['cpu']}, {s['cores']} cores, {s['threads_per_rank']} thread per rank (gloo), 1-min load average "
        f"{min(loads):.1f}-{max(loads):.1f}; torch {s['torch']}, transformers {s['transformers']}, accelerate "
        f"{s['accelerate']}, peft {s['peft']}, Python {s['python']}; HF ddp_find_unused_parameters="
        f"{s['hf_ddp_find_unused_parameters']}",
        "",
        "| framework | tokens/s (both ranks) | s/step (median) | tokens per CPU-s (rank 0) | CPU share (rank 0) "
        "| peak RSS rank 0 / 1 (MiB) "
        "| RSS growth in training rank 0 / 1 (MiB) | final step loss | held-out loss after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in ("ours", "hf"):
        r = s["sides"][side]
        lines.append(f"| {NAMES[side]} | {r['tokens_per_s']:.0f} | {r['ranks'][0]['median_step_s']:.3f} | "
                     f"{r['ranks'][0]['tokens_per_cpu_s']:.0f} | {r['ranks'][0]['cpu_share']:.2f} | "
                     f"{' / '.join(f'{x:.0f}' for x in r['peak_rss_mb'])} | "
                     f"{' / '.join(f'{x:.0f}' for x in r['rss_growth_mb'])} | {r['losses'][-1]:.4f} | "
                     f"{r['held_out_loss']:.6f} |")
    lines.append(f"| **ours / HF** | **{s['ratio_tokens_per_s']:.2f}x** | | {s['ratio_tokens_per_cpu_s']:.2f}x | | "
                 f"**{' / '.join(f'{x:.2f}x' for x in s['ratio_peak_rss'])}** | "
                 f"{' / '.join(f'{x:.2f}x' for x in s['ratio_rss_growth'])} | | diff {s['held_out_loss_diff']:.1e} |")
    lines += ["", f"largest |step loss difference| {s['max_abs_step_loss_diff']:.2e}; batches that differ between the "
                  f"sides: {s['data_mismatches']}; initial adapter vs the saved one: max |diff| "
                  f"{s['adapter_init_max_diff']:.1e}; all launches' tokens/s: ours {s['sides']['ours']['all_tokens_per_s']}, "
                  f"HF {s['sides']['hf']['all_tokens_per_s']}"]
    if min(r["ranks"][0]["cpu_share"] for r in s["sides"].values()) < 0.95:
        lines.append(BUSY_WARNING)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="10m", choices=["100k", "1m", "10m"], help="llama size (lmcycle build)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8, help="micro-batch per rank")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=1, help="launches per side (ABBA order); the best counts")
    p.add_argument("--ranks", type=int, default=2, help="processes (torchrun --nproc_per_node)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS) per rank")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r (alpha = 2r)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-find-unused", action="store_true",
                   help="leave the Trainer's ddp_find_unused_parameters choice (True for a PeftModel)")
    p.add_argument("--json", help="also write the summary to this JSON file")
    p.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tag", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        run_side(args.side, args.workdir, args, args.tag)
        return

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmcycle-ddp-bench-") as tmp:
        workdir = Path(tmp)
        info = prepare(workdir, args)
        runs: dict[str, list[list[dict]]] = {"ours": [], "hf": []}
        order = [side for r in range(args.repeats) for side in (("ours", "hf") if r % 2 == 0 else ("hf", "ours"))]
        for i, side in enumerate(order):
            runs[side].append(spawn_side(side, workdir, args, f"{side}-{i}"))
            r = runs[side][-1]
            peaks = " / ".join(f"{x['peak_rss_mb']:.0f}" for x in r)
            print(f"{side}: {r[0]['tokens_per_s']:.0f} tokens/s, peak RSS {peaks} MiB, CPU share "
                  f"{r[0]['cpu_share']:.2f}",
                  file=sys.stderr, flush=True)
    summary = summarise(info, runs, args)
    summary["benchmark_wall_s"] = round(time.perf_counter() - started, 1)
    print(table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
