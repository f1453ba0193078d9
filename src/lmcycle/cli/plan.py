"""``lmcycle plan``: training memory per rank (full FT / LoRA / QLoRA / prompt tuning, ddp or fsdp over N ranks)
and the compute-optimal budget."""

from __future__ import annotations

import json
from pathlib import Path

from lmcycle.errors import LmcycleError


def add_parser(sub) -> None:
    """Add the ``plan`` command to the CLI's subparsers."""
    pl = sub.add_parser("plan", help="memory (full FT / LoRA / QLoRA / prompt tuning) and compute-optimal budget")
    pl.add_argument("model", nargs="?", help="a local model folder or its config.json (only the config is read)")
    pl.add_argument("--arch", choices=("llama", "gpt2", "t5"), help="with --size: one of lmcycle's built-in sizes")
    pl.add_argument("--size", help="a named size of lmcycle build (100k, 1m, 10m)")
    pl.add_argument("--params", help="a parameter count (7e9, 7B, 125M): a llama-like shape of that size")
    pl.add_argument("--vocab", type=int, help="vocabulary for --size (default 2048) or --params (default 32000)")
    pl.add_argument("--seq-len", type=int, default=512)
    pl.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    pl.add_argument("--precision", choices=("fp32", "bf16", "int8", "nf4"),
                    help="weights (and the frozen base of LoRA / prompt tuning); default fp32, or --model-dtype's")
    pl.add_argument("--model-dtype", choices=("float32", "bfloat16", "fp32", "bf16"),
                    help="as a stage's model_dtype: sets the weights to fp32/bf16; bfloat16 full FT is pure bf16 "
                         "(no fp32 master copy); contradicting --precision is an error")
    pl.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                    help="ddp: full replicas (the grads are views into DDP's buckets); fsdp: FSDP2 per block, "
                         "sharded over the ranks (int8/nf4 block weights stay whole)")
    pl.add_argument("--world-size", type=int, default=1, help="ranks (processes); the figures are per rank")
    pl.add_argument("--lora-r", type=int, default=8)
    pl.add_argument("--lora-targets", help="comma-separated module names or regex suffixes (default: q/v)")
    pl.add_argument("--virtual-tokens", type=int, default=20, help="prompt tuning's soft prompt length")
    pl.add_argument("--tokens-per-s", type=float, help="training throughput, for the time of the token budget")
    pl.add_argument("--flops-per-s", type=float, help="sustained FLOP/s, the alternative to --tokens-per-s")
    pl.add_argument("--activation-checkpointing", action="store_true",
                    help="as train.activation_checkpointing: blocks keep their inputs, recompute the rest")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(fields=[])  # main() files stray key=value items here; run() rejects them


def run(args) -> int:
    """Print the plan (a table, or JSON with ``--json``)."""
    from lmcycle.train.memory_plan import make_plan, render, resolve_config  # lazy: torch, transformers

    stray = args.fields + ([args.model] if args.model and "=" in args.model and not Path(args.model).exists() else [])
    if stray:
        raise LmcycleError(f"unexpected arguments: {' '.join(stray)}", file="command line")
    config, name = resolve_config(args.model, args.arch, args.size, args.params, args.vocab)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    plan = make_plan(config, seq_len=args.seq_len, batch=args.batch, precision=args.precision, lora_r=args.lora_r,
                     lora_targets=targets, virtual_tokens=args.virtual_tokens, tokens_per_s=args.tokens_per_s,
                     flops_per_s=args.flops_per_s, name=name,
                     activation_checkpointing=args.activation_checkpointing, strategy=args.strategy,
                     world_size=args.world_size, model_dtype=args.model_dtype)
    print(json.dumps(plan.to_dict(), indent=2, ensure_ascii=False) if args.json else render(plan))
    return 0
