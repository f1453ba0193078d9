"""Training memory of full fine-tuning, LoRA, QLoRA (NF4) and prompt tuning, measured and as `lmcycle plan` predicts it.

    python benchmarks/peft_memory.py                        # llama-10m, batch 8 x 320 tokens, 4 steps
    python benchmarks/peft_memory.py --size 1m --seq-len 128 # a quick check
    python benchmarks/peft_memory.py --checkpointing both --vocab 512   # each method without and with
                                                                        # train.activation_checkpointing

Each method trains the same randomly initialised lmcycle llama (vocab 4096) with lmcycle's loop (`train()`), in
its own process, for a few steps on one fixed batch, and reports `TrainResult.rss_growth_mb`: the resident
memory the training loop added above what the process held when it started (weights were already loaded, so
the growth is gradients + AdamW states + saved activations + temporaries). It runs every method twice:

- with glibc's default allocator, which keeps freed blocks in the heap (RSS then also counts fragmentation:
  many small, differently sized tensors, as LoRA's and QLoRA's extra ones, make it worse);
- with ``MALLOC_MMAP_THRESHOLD_=65536``: large blocks are mmap'ed and returned when freed, so RSS follows the
  tensors actually alive — the number the planner models.

Memory, not speed: a busy machine does not change the result much. The seconds per step are printed too, for
the cost of activation checkpointing (one more forward pass of every block), but only as a rough figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["full", "lora", "qlora", "prompt_tuning"]


def child(method: str, size: str, seq_len: int, batch: int, steps: int, r: int, tokens: int, vocab: int,
          checkpointing: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lmcycle.adapt.lora import LoraConfig, add_lora
    from lmcycle.adapt.prompt_tuning import PromptTuningConfig, add_prompt_tuning
    from lmcycle.adapt.qlora import quantize_model
    from lmcycle.train.loop import TrainConfig, lm_loss_sum, train
    from lmcycle.train.memory_plan import config_for_size

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for_size("llama", size, vocab=vocab, max_len=1024))
    if method == "qlora":
        quantize_model(model, bits=4)
    if method in ("lora", "qlora"):
        add_lora(model, LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS))
    if method == "prompt_tuning":
        model = add_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=tokens))
    ids = torch.randint(3, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with tempfile.TemporaryDirectory() as out:
        result = train(model, lambda step: [data], lm_loss_sum,
                       TrainConfig(max_steps=steps, batch_size=batch, save_every=10_000, log_every=10_000,
                                   activation_checkpointing=checkpointing), out,
                       log=lambda **_: None, params=[p for p in model.parameters() if p.requires_grad])
    return {"method": method, "growth_mb": result.rss_growth_mb, "peak_mb": result.peak_rss_mb,
            "step_s": result.wall_time / steps,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def predicted(size: str, seq_len: int, batch: int, r: int, tokens: int, vocab: int,
              checkpointing: bool) -> dict[str, float]:
    """MiB the planner expects training to add: gradients + optimizer + activations (weights already loaded)."""
    from lmcycle.train.memory_plan import config_for_size, make_plan

    plan = make_plan(config_for_size("llama", size, vocab=vocab, max_len=1024), seq_len=seq_len, batch=batch,
                     lora_r=r, lora_targets=TARGETS, virtual_tokens=tokens, precision="fp32",
                     activation_checkpointing=checkpointing)
    rows = {"full": "full FT", "lora": "LoRA (", "qlora": "QLoRA (nf4", "prompt_tuning": "prompt tuning"}
    out = {}
    for method, prefix in rows.items():
        row = next(x for x in plan.rows if x.method.startswith(prefix))
        out[method] = (row.grads + row.optimizer + row.activations) / 2**20
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="10m")
    p.add_argument("--seq-len", type=int, default=320)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--r", type=int, default=6)
    p.add_argument("--virtual-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--checkpointing", choices=("off", "on", "both"), default="off",
                   help="train.activation_checkpointing for every method (both: each method twice)")
    p.add_argument("--json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-checkpointing", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.size, a.seq_len, a.batch, a.steps, a.r, a.virtual_tokens, a.vocab,
                               a.child_checkpointing)))
        return 0
    settings = {"off": [False], "on": [True], "both": [False, True]}[a.checkpointing]
    rows = [(method, ckpt) for method in METHODS for ckpt in settings]
    results: dict[str, dict] = {}
    for allocator in ("default", "mmap64k"):
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        if allocator == "mmap64k":
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        for method, ckpt in rows:
            cmd = [sys.executable, __file__, "--child", method, "--size", a.size, "--seq-len", str(a.seq_len),
                   "--batch", str(a.batch), "--steps", str(a.steps), "--r", str(a.r),
                   "--virtual-tokens", str(a.virtual_tokens), "--vocab", str(a.vocab)]
            cmd += ["--child-checkpointing"] if ckpt else []
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            results.setdefault(_label(method, ckpt), {})[allocator] = json.loads(out.strip().splitlines()[-1])
    plan = {_label(method, ckpt): mib for ckpt in settings
            for method, mib in predicted(a.size, a.seq_len, a.batch, a.r, a.virtual_tokens, a.vocab, ckpt).items()}
    print(f"llama-{a.size} (vocab {a.vocab}), batch {a.batch} x {a.seq_len} tokens, {a.steps} steps, LoRA r={a.r} "
          f"on all 7 linear layers, prompt tuning {a.virtual_tokens} tokens, {a.threads} thread(s)\n")
    print("| method | trainable params | added by training, glibc default (MiB) | added, mmap threshold 64 KiB (MiB) "
          "| `lmcycle plan` (MiB) | measured / plan | s/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, ckpt in rows:
        label = _label(method, ckpt)
        d, m = results[label]["default"], results[label]["mmap64k"]
        print(f"| {label} | {m['trainable']:,} | {d['growth_mb']:.0f} | {m['growth_mb']:.0f} | {plan[label]:.0f} "
              f"| {m['growth_mb'] / plan[label]:.2f} | {m['step_s']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results, "plan_mb": plan}, f, indent=2)
    return 0


def _label(method: str, checkpointing: bool) -> str:
    return method + (" + activation checkpointing" if checkpointing else "")


if __name__ == "__main__":
    sys.exit(main())
