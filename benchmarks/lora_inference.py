"""Inference cost of a LoRA adapter: unmerged vs merged, lmcycle's LoRA layers and PEFT's (for reference).

    python benchmarks/lora_inference.py                   # llama-10m, r=8 on q_proj/v_proj, 128-token forward, 32 new tokens
    python benchmarks/lora_inference.py --size 1m --repeats 2 --new-tokens 8   # a quick check
    python benchmarks/lora_inference.py --targets q_proj k_proj v_proj o_proj gate_proj up_proj down_proj --json inf.json

One base model (an lmcycle-built llama, tokenizer trained on the built-in synthetic dialogues) gets one adapter:
``add_lora`` (A kaiming-uniform as PEFT does), then B drawn from N(0, ``--b-std``) so the adapter changes the
output (a fresh adapter has B = 0). The adapter is saved in PEFT format and loaded by PEFT on a second copy of
the base, so both frameworks run the *same* weights. For each framework and each state:

- ``unmerged``: base(x) + scaling * B(A(x)) in every adapted layer (what training and adapter-switching use);
- ``merged``: ``merge_lora`` / PEFT ``merge_adapter``: B @ A folded into the base weights, the wrapper layers stay;
- ``merged+unloaded``: ``merge_and_unload`` (both libraries): the wrappers are gone, a plain model;

it times, at batch 1 and batch ``--batch`` (default 8):

- ``forward``: one no-grad forward pass over ``[batch, --prompt-len]`` tokens (no KV cache), fastest of
  ``--repeats`` after one warm-up call (the JSON has the median too);
- ``generate``: lmcycle's greedy ``generate_ids`` of ``--new-tokens`` tokens for ``batch`` synthetic-dialogue
  prompts (``summarize`` template), fastest of ``--repeats`` after one warm-up; new tokens/s counts the tokens
  actually produced (a row can stop early at EOS; the table says how many were made).

The PEFT side is timed through ``peft_model.get_base_model()`` (the transformers model with PEFT's LoRA layers
injected, which is what ``PeftModel.forward`` calls) with the same decoding loop as ours, so the only
difference between the two is the LoRA layer implementation. Checks: the logits of every variant against ours
unmerged (max |diff|) and whether the greedy tokens agree.

Ratios are latency unmerged / merged (> 1: the unmerged adapter is slower). ``--threads`` torch threads (default 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from measure import load_average, version

TEMPLATE = "summarize"
STATES = ("unmerged", "merged", "merged+unloaded")


def build(workdir: Path, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """Save tokenizer + model to ``workdir/model``; return it and the rendered synthetic prompts."""
    from lmcycle.data.synthetic import synthetic_dialogues
    from lmcycle.data.templates import get_template
    from lmcycle.models.build import build_model, train_tokenizer

    exs = synthetic_dialogues(max(200, args.batch), args.seed)
    tokenizer = train_tokenizer([t for ex in exs for t in (ex.input, *ex.targets)], 2048, seq2seq=False,
                                max_len=args.max_len)
    model = build_model("llama", args.size, tokenizer, args.max_len, seed=0)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    template = get_template(TEMPLATE)
    return workdir / "model", [template.render(ex, []) for ex in exs]


def ours_with_adapter(model_dir: Path, adapter_dir: Path, args: argparse.Namespace):
    """The base with our adapter (B random, non-zero), saved in PEFT format to ``adapter_dir``."""
    from transformers import AutoModelForCausalLM

    from lmcycle.adapt.lora import LoraConfig, add_lora, lora_layers, save_lora

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(args.seed)
    add_lora(model, LoraConfig(r=args.rank, alpha=args.alpha, target_modules=args.targets))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=args.b_std)
    save_lora(model, "default", adapter_dir, base_model_name_or_path=str(model_dir))
    return model.eval()


def peft_with_adapter(model_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def set_state(framework: str, model, state: str):
    """Put ``model`` in ``state`` (called in STATES order); return the module to run."""
    from lmcycle.adapt.lora import merge_and_unload, merge_lora, unmerge_lora

    if framework == "ours":
        if state == "merged":
            merge_lora(model)
        elif state == "merged+unloaded":
            unmerge_lora(model)
            merge_and_unload(model)
        return model.eval()
    if state == "merged":
        model.merge_adapter()
    elif state == "merged+unloaded":
        model.unmerge_adapter()
        return model.merge_and_unload().eval()
    return model.get_base_model().eval()


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """Fastest and median wall time of ``fn()`` over ``repeats`` calls after one warm-up call; the last result.

    The fastest is what the table shows: on a shared machine other work only ever adds time.
    """
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), out


def measure(model, tokenizer, prompts: list[str], blocks: torch.Tensor, args: argparse.Namespace) -> dict:
    """Forward and greedy-generation timings at each batch size, plus the outputs to compare."""
    from lmcycle.models.generate import DecodingConfig, generate_ids

    out = {}
    for b in sorted({1, args.batch}):
        x = blocks[:b]

        def forward(x=x):
            with torch.no_grad():
                return model(input_ids=x, use_cache=False).logits

        cfg = DecodingConfig(max_new_tokens=args.new_tokens, batch_size=b)
        fwd_s, fwd_median_s, logits = timed(forward, args.repeats)
        gen_s, gen_median_s, ids = timed(lambda b=b, cfg=cfg: generate_ids(model, tokenizer, prompts[:b], cfg),
                                         args.repeats)
        made = sum(len(r) for r in ids)
        if min(len(r) for r in ids) < args.new_tokens:
            print(f"note: a row stopped at EOS before {args.new_tokens} tokens (batch {b})", file=sys.stderr)
        out[b] = {"forward_s": fwd_s, "forward_median_s": fwd_median_s, "forward_tokens_per_s": x.numel() / fwd_s,
                  "generate_s": gen_s, "generate_median_s": gen_median_s,
                  "new_tokens": made, "min_new_tokens": min(len(r) for r in ids),
                  "generate_tokens_per_s": made / gen_s, "logits": logits, "ids": ids}
    return out


def run(args: argparse.Namespace) -> tuple[dict, list[float]]:
    """Timings per framework, state and batch size; and the load average after each state's measurements."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="lmcycle-lora-inf-") as tmp:
        workdir = Path(tmp)
        model_dir, prompts = build(workdir, args)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = tokenizer("\n\n".join(prompts), verbose=False)["input_ids"]
        blocks = torch.tensor(ids[:args.batch * args.prompt_len]).view(args.batch, args.prompt_len)
        models = {"ours": ours_with_adapter(model_dir, workdir / "adapter", args),
                  "peft": peft_with_adapter(model_dir, workdir / "adapter")}
        results: dict[str, dict[str, dict]] = {}
        loads = [load_average()]
        for framework, model in models.items():
            results[framework] = {}
            for state in STATES:
                module = set_state(framework, model, state)
                results[framework][state] = measure(module, tokenizer, prompts, blocks, args)
                loads.append(load_average())
    return results, loads


def summarise(results: dict, loads: list[float], args: argparse.Namespace) -> dict:
    ref = results["ours"]["unmerged"]
    rows = []
    for framework, states in results.items():
        for state, per_batch in states.items():
            for b, r in per_batch.items():
                rows.append({
                    "framework": framework, "state": state, "batch": b,
                    **{k: v for k, v in r.items() if k not in ("logits", "ids")},
                    "logits_max_abs_diff_vs_ours_unmerged": float((r["logits"] - ref[b]["logits"]).abs().max()),
                    "same_tokens_as_ours_unmerged": r["ids"] == ref[b]["ids"],
                })
    ratios = {}
    for framework, states in results.items():
        for b in states["unmerged"]:
            un, me = states["unmerged"][b], states["merged"][b]
            ratios[f"{framework}_batch{b}"] = {"forward": un["forward_s"] / me["forward_s"],
                                               "generate": un["generate_s"] / me["generate_s"]}
    return {
        "date": date.today().isoformat(), "size": f"llama-{args.size}",
        "lora": {"r": args.rank, "alpha": args.alpha, "targets": args.targets, "b_std": args.b_std},
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__,
        "transformers": version("transformers"), "peft": version("peft"), "python": platform.python_version(),
        "rows": rows, "ratio_unmerged_over_merged": ratios,
        "load_average": loads,
    }


def table(s: dict) -> str:
    lora = s["lora"]
    lines = [
        f"{s['size']}, LoRA r={lora['r']} alpha={lora['alpha']} on {', '.join(lora['targets'])} (B ~ N(0, "
        f"{lora['b_std']})), fp32, forward over {s['prompt_len']} tokens per row, greedy generation of "
        f"{s['new_tokens']} new tokens (lmcycle generate_ids), fastest of {s['repeats']} after a warm-up call",
        f"{s['threads']} torch threads on {s['cores']} cores, 1-min load average {min(s['load_average']):.1f}-"
        f"{max(s['load_average']):.1f}; torch {s['torch']}, transformers "
        f"{s['transformers']}, peft {s['peft']}, Python {s['python']}",
        "",
        "| LoRA layers | state | batch | forward (ms) | forward tokens/s | generate (ms) | new tokens/s "
        "| new tokens made | logits max diff vs ours unmerged | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        lines.append(f"| {r['framework']} | {r['state']} | {r['batch']} | {1e3 * r['forward_s']:.1f} | "
                     f"{r['forward_tokens_per_s']:.0f} | {1e3 * r['generate_s']:.1f} | "
                     f"{r['generate_tokens_per_s']:.1f} | {r['new_tokens']} | "
                     f"{r['logits_max_abs_diff_vs_ours_unmerged']:.1e} | {r['same_tokens_as_ours_unmerged']} |")
    lines += ["", "| latency unmerged / merged | forward | generate |", "|---|---|---|"]
    for key, ratio in s["ratio_unmerged_over_merged"].items():
        framework, batch = key.split("_batch")
        lines.append(f"| {framework}, batch {batch} | **{ratio['forward']:.2f}x** | **{ratio['generate']:.2f}x** |")
    if max(s["load_average"]) > s["threads"] + 0.5 and s["cores"] <= 2 * s["threads"]:
        lines.append("\nWARNING: the load average exceeded the thread count: other work competed for the cores, "
                     "the timings are not reliable; run again on an idle machine.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="10m", choices=["100k", "1m", "10m"], help="llama size (lmcycle build)")
    parser.add_argument("--batch", type=int, default=8, help="the larger batch size (batch 1 is always run)")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per row of the timed forward pass")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate")
    parser.add_argument("--max-len", type=int, default=512, help="the model's context window")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (the fastest counts)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="LoRA target modules")
    parser.add_argument("--b-std", type=float, default=0.02, help="std of the random B (non-zero adapter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the summary to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    summary = summarise(*run(args), args)
    summary["benchmark_wall_s"] = round(time.perf_counter() - started, 1)
    print(table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
