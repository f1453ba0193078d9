"""Scale-out: lmcycle's DDP and FSDP2 engines on a Llama-3.2-1B-shaped LoRA SFT, per rank, vs ``lmcycle plan``.

    python benchmarks/scale_out.py --shape tiny                       # ~12M llama, 2 CPU ranks, a quick check
    python benchmarks/scale_out.py --json scale-out-1b.json           # the 1B shape, ddp then fsdp, 2 CPU ranks
    python benchmarks/scale_out.py --device cuda --json gpu-1b.json   # one GPU, one process: tokens/s and MFU
    python benchmarks/scale_out.py --plan-7b                          # the 7B plan table (no training)

The model is a ``LlamaForCausalLM`` built from Llama-3.2-1B's published config (:data:`LLAMA_32_1B`, written
out here: no Hub access needed) with seeded random weights, created directly in bfloat16 (``_from_config(...,
dtype=torch.bfloat16)``: no fp32 copy ever exists), as a stage with ``model_dtype: bfloat16`` holds it. lmcycle's
own LoRA (``add_lora``, r=16, alpha=32, on all seven projections q/k/v/o/gate/up/down; its A and B are fp32, as
``add_adapter`` makes them over a 16-bit base) is the only trainable part. The loss is SFT's token loss
(``lm_loss_sum``) on seeded random token ids, every position a label; ``train.bf16: true`` (autocast) and
``train.activation_checkpointing: true``. Each micro-batch depends on (step, rank) only, so both engines see the
same data and must reach the same losses (up to bf16 rounding of the different reduction orders).

CPU (the default when no GPU is seen): ``torchrun --standalone --nproc_per_node 2`` (gloo), once with
``distributed.strategy: ddp`` and once with ``fsdp`` (FSDP2 ``fully_shard`` per block + root, bf16
``MixedPrecisionPolicy``), each rank with ``OMP_NUM_THREADS=1`` (2 ranks = 2 cores) and
``MALLOC_MMAP_THRESHOLD_=65536`` (so that RSS follows the tensors alive, as in ``peft_memory.py``; ``--allocator
default`` turns it off). Per rank:

- *peak RSS in training*: the kernel's high-water mark (VmHWM), which ``train()`` resets after building its
  engine, read at the start of the last step (the last step itself is not run: the run stops there, so neither
  it nor the final checkpoint counts). *Above baseline*: that minus the RSS the rank had before the model was
  built (Python, torch, transformers, the process group): what the plan's figures cover.
- *weights held*: bytes of the parameters the rank keeps between steps: DDP the whole model (bf16 base + fp32
  LoRA); FSDP the local shards (``DTensor.to_local()``) of the engine's sharded model plus what is left in the
  trainer's emptied model (0).
- *tokens/s*: input tokens (batch x seq_len per rank per step) from the start of step 1 to the start of the
  last step (step 0 is warm-up).

The plan column is ``make_plan`` (what ``lmcycle plan`` prints) for the same settings: ``--model-dtype bf16
--strategy S --world-size N --lora-r 16 --lora-targets <7> --seq-len T --batch B --activation-checkpointing``,
the LoRA row's total per rank.

GPU (``--device cuda``): one process, no wrapper (``LocalEngine``), the same model and loss; tokens/s over the
timed steps and MFU = tokens/s x 6 x N / peak, where N counts *every* parameter (the frozen bf16 base, the
tied embedding once: it is the LM head's matmul; the LoRA A/B) and peak is ``--peak-tflops`` (H200 SXM: 989
dense bf16). 6N is the usual full-training convention: with a frozen base the weight-gradient matmuls are not
done (about 4N of work), and activation checkpointing recomputes the forward (2N more) that is not counted
either; attention's s^2 term is left out. Also ``torch.cuda.max_memory_allocated`` next to the plan for 1 rank.
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

from measure import cpu_name, load_average, rss_mb, version  # noqa: E402

# Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B), the fields that shape the model.
LLAMA_32_1B = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
}
# A ~12M llama of the same family (GQA, tied, llama3 rope) for quick correctness runs.
TINY = {**LLAMA_32_1B, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
        "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8192,
        "bos_token_id": 1, "eos_token_id": 2}
# Llama-2-7B (meta-llama/Llama-2-7b-hf): MHA, untied, 32k vocabulary.
LLAMA_2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 10000.0}
SHAPES = {"1b": LLAMA_32_1B, "tiny": TINY, "7b": LLAMA_2_7B}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
H200_BF16_TFLOPS = 989.0  # dense bf16, NVIDIA's H200 SXM datasheet


def llama_config(shape: str | dict):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**(SHAPES[shape] if isinstance(shape, str) else shape))
    cfg._attn_implementation = "sdpa"
    return cfg


# -- the plan -------------------------------------------------------------------------------------------------


def plan_rows(config, *, strategy: str, world: int, seq_len: int, batch: int, r: int, checkpointing: bool,
              targets: list[str] | None = TARGETS) -> dict[str, dict]:
    """``lmcycle plan --model-dtype bf16 ...``'s rows per rank, by method label: bytes of each part and total."""
    from lmcycle.train.memory_plan import make_plan

    plan = make_plan(config, seq_len=seq_len, batch=batch, model_dtype="bf16", lora_r=r, lora_targets=targets,
                     activation_checkpointing=checkpointing, strategy=strategy, world_size=world)
    return {row["method"]: row for row in plan.to_dict()["rows"]}


def lora_plan(config, **kw) -> dict:
    rows = plan_rows(config, **kw)
    return next(v for k, v in rows.items() if k.startswith("LoRA"))


# -- one rank (under torchrun) or the single GPU process -------------------------------------------------------


class Finished(Exception):
    """Raised by ``batch_at`` at the last step: everything is measured, the step and the final save are skipped."""


def held_weight_bytes(engine, model) -> tuple[int, int]:
    """(bytes of the parameters this rank holds, of which trainable): the engine's sharded model's local shards
    (FSDP) or the whole model (DDP / one process), plus what the trainer's model still holds itself."""
    from torch.distributed.tensor import DTensor

    def local(p):
        return p.to_local() if isinstance(p, DTensor) else p

    seen: dict[int, tuple[int, bool]] = {}  # by parameter: a tied weight counts once
    models = [model] if engine.compute_model is model else [engine.compute_model, model]
    for m in models:
        for p in m.parameters():
            t = local(p)
            seen[id(p)] = (t.numel() * t.element_size(), p.requires_grad)
    return sum(b for b, _ in seen.values()), sum(b for b, g in seen.values() if g)


def trainable_sumsq(params) -> float:
    """Sum of squares of every trained parameter, whole (a collective under FSDP: every rank calls it)."""
    import torch
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        return float(sum(float((p.full_tensor() if isinstance(p, DTensor) else p).double().square().sum())
                         for p in params))


def run_rank(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import lmcycle.train.loop as loop
    from lmcycle.adapt.lora import LoraConfig, add_lora
    from lmcycle.train.distributed import init_distributed
    from lmcycle.train.engines import DistributedConfig

    me, world = init_distributed()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    baseline_rss = rss_mb()
    config = llama_config(args.shape)

    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if args.checkpoint:  # as a stage loads it: FSDP builds on the meta device and reads its shards only
        from lmcycle.models.load import load_empty, load_pretrained

        loaded = None
        if args.strategy == "fsdp" and world > 1:
            loaded = load_empty(args.checkpoint, dtype=torch.bfloat16, device=device)
        model = (loaded or load_pretrained(args.checkpoint, dtype=torch.bfloat16, device=device))[0]
        info_load = "sharded (load_empty)" if loaded else "whole (load_pretrained)"
    else:
        with device:
            model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        info_load = "built in memory"
    add_lora(model, LoraConfig(r=args.r, alpha=2 * args.r, dropout=0.0, target_modules=TARGETS))
    build_s = time.perf_counter() - started
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") + ("(trainable)" if p.requires_grad else "")
                     for p in model.parameters()})

    engines = []  # the engine train() builds, captured for the weight count
    build_engine = loop.build_engine

    def capture(*a, **kw):
        engines.append(build_engine(*a, **kw))
        # VmHWM up to here: building the model, then the engine (FSDP: sharding while the full copy still exists);
        # train() resets it right after.
        info["setup_and_engine_peak_rss_mb"] = loop.peak_rss_mb()
        info["after_engine_rss_anon_mb"], info["after_engine_rss_file_mb"] = rss_mb("RssAnon"), rss_mb("RssFile")
        return engines[-1]

    loop.build_engine = capture
    total = args.steps + 1  # step 0 warms up; steps 1..steps are timed; the run stops at the start of the next
    times: dict[int, float] = {}
    cpu: dict[int, float] = {}
    info: dict = {"load": info_load}
    vocab = config.vocab_size

    def batch_at(step: int):
        if step == 0:
            info["weight_bytes"], info["trainable_bytes"] = held_weight_bytes(engines[-1], model)
            info["engine"] = type(engines[-1]).__name__
            info["rss_at_first_step_mb"] = rss_mb()
        if step in (0, total):  # the trained parameters' sum of squares, before any update and after the last
            info[f"trainable_sumsq_step{step}"] = trainable_sumsq(engines[-1].params)
        times[step], cpu[step] = time.perf_counter(), time.process_time()
        if step == total:
            info["peak_rss_train_mb"] = loop.peak_rss_mb()  # VmHWM since train() reset it
            if device.type == "cuda":
                info["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
            raise Finished
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * world + me)
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(device)
        return [{"input_ids": ids, "labels": ids}]

    losses: list[float] = []
    cfg = loop.TrainConfig(max_steps=total + 1, batch_size=args.batch, lr=1e-4, min_lr_ratio=1.0, warmup_steps=0,
                           max_grad_norm=1.0, bf16=True, activation_checkpointing=not args.no_checkpointing,
                           seed=args.seed, save_every=0, log_every=1, spike_factor=None,
                           distributed=DistributedConfig(strategy="fsdp" if args.strategy == "fsdp" else "ddp"))  # one process: none
    setup_peak = loop.peak_rss_mb()  # VmHWM so far: building the model (and nothing else yet)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="lmcycle-scale-out-") as out:
        try:
            loop.train(model, batch_at, loop.lm_loss_sum, cfg, out,
                       log=lambda **m: losses.append(m["loss"]) if "loss" in m else None, params=trainable)
        except Finished:
            pass
    window = times[total] - times[1]
    tokens = args.steps * args.batch * args.seq_len  # this rank's, in the timed window
    result = {
        "rank": me, "world": world, "strategy": args.strategy if world > 1 else "single",
        "device": str(device), "threads": torch.get_num_threads(), "params": n_params, "trainable": n_trainable,
        "dtypes": dtypes, "build_s": build_s, "baseline_rss_mb": baseline_rss, "setup_peak_rss_mb": setup_peak,
        **info, "peak_above_baseline_mb": info["peak_rss_train_mb"] - baseline_rss,
        "window_s": window, "step_s": [times[s + 1] - times[s] for s in range(total)],
        "tokens_per_s": tokens / window, "cpu_share": (cpu[total] - cpu[1]) / (window * torch.get_num_threads()),
        "losses": losses, "load_average": load_average(),
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.strategy}-rank{me}.json").write_text(json.dumps(result), encoding="utf-8")
    return result


# -- the launcher ---------------------------------------------------------------------------------------------


def write_checkpoint(args: argparse.Namespace, path: Path) -> None:
    """Save the shape's seeded random bf16 model (and a stand-in tokenizer) with ``save_pretrained``."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(args.seed)
    LlamaForCausalLM._from_config(llama_config(args.shape), dtype=torch.bfloat16).save_pretrained(path)
    vocab = Tokenizer(WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=vocab, eos_token="<eos>").save_pretrained(path)


def launch(strategy: str, args: argparse.Namespace, out: Path) -> list[dict]:
    """Run ``strategy`` on ``args.nproc`` CPU ranks under torchrun; every rank's result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, "--rank-worker", "--strategy", strategy, "--out", str(out), *common_args(args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    if args.allocator == "mmap64k":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{strategy} failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    ranks = [json.loads((out / f"{strategy}-rank{r}.json").read_text(encoding="utf-8")) for r in range(args.nproc)]
    for r in ranks:
        r["launch_wall_s"] = time.perf_counter() - started
    return ranks


def common_args(args: argparse.Namespace) -> list[str]:
    out = ["--shape", args.shape, "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--steps",
           str(args.steps), "--lora-r", str(args.r), "--seed", str(args.seed), "--threads", str(args.threads),
           "--device", "cpu"]
    out += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    return out + (["--no-checkpointing"] if args.no_checkpointing else [])


def environment() -> dict:
    import torch

    return {"date": date.today().isoformat(), "torch": torch.__version__, "transformers": version("transformers"),
            "python": platform.python_version(), "cpu": cpu_name(), "cores": os.cpu_count()}


def summarise_cpu(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    config = llama_config(args.shape)
    rows = {}
    for strategy, ranks in runs.items():
        plan = lora_plan(config, strategy=strategy, world=args.nproc, seq_len=args.seq_len, batch=args.batch,
                         r=args.r, checkpointing=not args.no_checkpointing)
        predicted = plan["total"] / 2**20
        rows[strategy] = {
            "ranks": ranks, "plan": plan, "plan_mb": predicted,
            "ratio_measured_over_plan": [r["peak_above_baseline_mb"] / predicted for r in ranks],
            "tokens_per_s_total": sum(r["tokens_per_s"] for r in ranks),
        }
    s = {**environment(), "shape": args.shape, "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps,
         "lora_r": args.r, "lora_alpha": 2 * args.r, "targets": TARGETS, "nproc": args.nproc,
         "threads_per_rank": args.threads, "allocator": args.allocator,
         "activation_checkpointing": not args.no_checkpointing, "strategies": rows}
    if "ddp" in rows and "fsdp" in rows:
        d, f = rows["ddp"]["ranks"], rows["fsdp"]["ranks"]
        s["fsdp_over_ddp_weight_bytes"] = max(b["weight_bytes"] for b in f) / max(a["weight_bytes"] for a in d)
        s["fsdp_over_ddp_peak_rss"] = max(b["peak_rss_train_mb"] for b in f) / max(a["peak_rss_train_mb"] for a in d)
        s["fsdp_over_ddp_tokens_per_s"] = rows["fsdp"]["tokens_per_s_total"] / rows["ddp"]["tokens_per_s_total"]
        s["trainable_sumsq"] = {k: [v["ranks"][0]["trainable_sumsq_step0"], v["ranks"][0][f"trainable_sumsq_step{args.steps + 1}"]]
                                for k, v in rows.items()}
        a, b = s["trainable_sumsq"]["ddp"][1], s["trainable_sumsq"]["fsdp"][1]
        s["trainable_sumsq_rel_diff_ddp_fsdp"] = abs(a - b) / abs(a)
        la, lb = d[0]["losses"], f[0]["losses"]
        s["loss_max_abs_diff_ddp_fsdp"] = max(abs(a - b) for a, b in zip(la, lb, strict=False)) if la else None
    return s


def table_cpu(s: dict) -> str:
    first = next(iter(s["strategies"].values()))["ranks"][0]
    loads = [r["load_average"] for v in s["strategies"].values() for r in v["ranks"]]
    lines = [
        f"{s['shape']} shape: {first['params'] / 1e6:.1f}M params ({', '.join(first['dtypes'])}), LoRA r={s['lora_r']} "
        f"alpha={s['lora_alpha']} on q/k/v/o/gate/up/down = {first['trainable']:,} trainable; batch {s['batch']} x "
        f"{s['seq_len']} tokens per rank, bf16 autocast, activation checkpointing "
        f"{'on' if s['activation_checkpointing'] else 'off'}, {s['steps']} timed steps after 1 warm-up",
        f"{s['nproc']} ranks x {s['threads_per_rank']} thread (gloo), allocator {s['allocator']}; {s['cpu']}, "
        f"{s['cores']} cores, 1-min load average at the end {min(loads):.1f}-{max(loads):.1f}; torch {s['torch']}, "
        f"transformers {s['transformers']}, Python {s['python']}; {s['date']}",
        "",
        "| strategy | rank | engine | weights held (MiB) | peak RSS in training (MiB) | above baseline (MiB) "
        "| `lmcycle plan` per rank (MiB) | measured / plan | tokens/s (rank) | s/step | CPU share | final loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for strategy, v in s["strategies"].items():
        for r, ratio in zip(v["ranks"], v["ratio_measured_over_plan"], strict=True):
            steps = r["step_s"][1:]
            lines.append(
                f"| {strategy} | {r['rank']} | {r['engine']} | {r['weight_bytes'] / 2**20:.0f} | "
                f"{r['peak_rss_train_mb']:.0f} | {r['peak_above_baseline_mb']:.0f} | {v['plan_mb']:.0f} | "
                f"{ratio:.2f} | {r['tokens_per_s']:.1f} | {sum(steps) / len(steps):.1f} | {r['cpu_share']:.2f} | "
                f"{v['ranks'][0]['losses'][-1]:.4f} |")  # the loss is global (all ranks), logged by rank 0
    if "fsdp_over_ddp_weight_bytes" in s:
        lines += ["", f"FSDP / DDP: weights held {s['fsdp_over_ddp_weight_bytes']:.3f}x, peak RSS in training "
                      f"{s['fsdp_over_ddp_peak_rss']:.2f}x, tokens/s {s['fsdp_over_ddp_tokens_per_s']:.2f}x; "
                      f"largest |loss difference| per step ddp vs fsdp {s['loss_max_abs_diff_ddp_fsdp']:.2e}; "
                      "sum of squares of the trained (LoRA) parameters before -> after: " + "; ".join(
                          f"{k} {x:.6f} -> {y:.6f}" for k, (x, y) in s["trainable_sumsq"].items())
                  + f" (ddp vs fsdp after: relative difference {s['trainable_sumsq_rel_diff_ddp_fsdp']:.1e})"]
    for strategy, v in s["strategies"].items():
        p = v["plan"]
        parts = ", ".join(f"{k} {p[k] / 2**20:.0f}" for k in ("weights", "grads", "optimizer", "activations",
                                                            "distributed"))
        lines.append(f"plan {strategy} (MiB): {parts}; total {p['total'] / 2**20:.0f}")
    lines.append("baseline = RSS before the model is built (Python, torch, transformers, process group): "
                 + ", ".join(f"{k} {v['ranks'][0]['baseline_rss_mb']:.0f} MiB" for k, v in s["strategies"].items())
                 + "; the model " + ", ".join(f"{k} {v['ranks'][0]['load']}" for k, v in s["strategies"].items())
                 + "; peak while building or loading the model, before train(): "
                 + ", ".join(f"{k} {max(r['setup_peak_rss_mb'] for r in v['ranks']):.0f} MiB"
                             for k, v in s["strategies"].items())
                 + "; peak up to the engine built (model + DDP wrapper / FSDP sharding): "
                 + ", ".join(f"{k} {max(r.get('setup_and_engine_peak_rss_mb', float('nan')) for r in v['ranks']):.0f}"
                             " MiB" for k, v in s["strategies"].items())
                 + "; right after the engine is built, the rank's own memory (RssAnon) / mapped file pages "
                 "(RssFile): " + ", ".join(f"{k} {max(r.get('after_engine_rss_anon_mb', float('nan')) for r in v['ranks']):.0f}"
                                         f" / {max(r.get('after_engine_rss_file_mb', float('nan')) for r in v['ranks']):.0f} MiB"
                                         for k, v in s["strategies"].items()))
    return "\n".join(lines)


def summarise_gpu(r: dict, args: argparse.Namespace) -> dict:
    plan = lora_plan(llama_config(args.shape), strategy="ddp", world=1, seq_len=args.seq_len, batch=args.batch,
                     r=args.r, checkpointing=not args.no_checkpointing)
    mfu = r["tokens_per_s"] * 6 * r["params"] / (args.peak_tflops * 1e12)
    return {**environment(), "shape": args.shape, "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps,
            "lora_r": args.r, "run": r, "mfu_6n": mfu, "peak_tflops": args.peak_tflops,
            "flops_counted": "6 x all parameters (frozen base included, tied embedding once) per token; no "
                             "attention s^2 term, no recomputation", "plan": plan}


def table_gpu(s: dict) -> str:
    r = s["run"]
    steps = r["step_s"][1:]
    return "\n".join([
        f"{s['shape']} shape on {r.get('gpu', r['device'])}: {r['params'] / 1e6:.1f}M params, LoRA r={s['lora_r']} "
        f"all 7 projections ({r['trainable']:,} trainable), batch {s['batch']} x {s['seq_len']}, bf16 autocast, "
        f"one process; {s['steps']} timed steps; torch {s['torch']}, {s['date']}",
        "",
        "| tokens/s | s/step | MFU (6N / peak bf16) | peak bf16 TFLOP/s | max allocated (MiB) | `lmcycle plan` 1 rank (MiB) "
        "| final loss |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['tokens_per_s']:.0f} | {sum(steps) / len(steps):.3f} | {100 * s['mfu_6n']:.1f}% | {s['peak_tflops']:.0f} "
        f"| {r.get('cuda_max_allocated_mb', float('nan')):.0f} | {s['plan']['total'] / 2**20:.0f} | "
        f"{r['losses'][-1]:.4f} |",
        f"FLOPs counted: {s['flops_counted']}",
    ])


# -- the 7B plan table ----------------------------------------------------------------------------------------


def plan_7b_table(seq_len: int, batch: int, r: int, checkpointing: bool) -> str:
    config = llama_config(LLAMA_2_7B)
    cells: dict[tuple[str, str, int], dict] = {}
    for strategy in ("ddp", "fsdp"):
        for world in (1, 2, 8):
            for method, row in plan_rows(config, strategy=strategy, world=world, seq_len=seq_len, batch=batch,
                                         r=r, checkpointing=checkpointing, targets=None).items():
                cells[(method, strategy, world)] = row
    methods = list(dict.fromkeys(m for m, _, _ in cells))
    cols = [(s, w) for s in ("ddp", "fsdp") for w in (1, 2, 8)]
    flags = f"--model-dtype bf16 --seq-len {seq_len} --batch {batch} --lora-r {r}" + (
        " --activation-checkpointing" if checkpointing else "")
    lines = [f"Llama-2-7B shape (`lmcycle plan <its config.json> {flags} --strategy S --world-size N`; LoRA on the "
             "default targets q/v): GB per rank, total (weights in brackets)", "",
             "| method | " + " | ".join(f"{s} x{w}" for s, w in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(
            f"{cells[(m, s, w)]['total'] / 1e9:.1f} ({cells[(m, s, w)]['weights'] / 1e9:.1f})" for s, w in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cpu: torchrun over --nproc CPU ranks; cuda: one process on one GPU; auto: cuda if seen")
    p.add_argument("--strategies", default="ddp,fsdp", help="CPU: comma-separated, each its own torchrun")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS) per rank")
    p.add_argument("--seq-len", type=int, help="default 256 on CPU, 2048 on GPU")
    p.add_argument("--batch", type=int, help="micro-batch per rank; default 1 on CPU, 8 on GPU")
    p.add_argument("--steps", type=int, help="timed steps after 1 warm-up; default 3 on CPU, 10 on GPU")
    p.add_argument("--lora-r", dest="r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-checkpointing", action="store_true", help="train.activation_checkpointing off")
    p.add_argument("--allocator", choices=("mmap64k", "default"), default="mmap64k")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="GPU: dense bf16 peak for MFU")
    p.add_argument("--plan-7b", action="store_true", help="print the Llama-2-7B plan table and exit")
    p.add_argument("--json", help="also write the summary to this JSON file")
    p.add_argument("--from-checkpoint", action="store_true",
                   help="save the model first, then load it as a stage does (fsdp: sharded, from the meta device)")
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--write-checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_worker:
        run_rank(args)
        return
    if args.write_checkpoint:
        write_checkpoint(args, Path(args.write_checkpoint))
        return
    if args.plan_7b:
        print(plan_7b_table(args.seq_len or 512, args.batch or 1, args.r, not args.no_checkpointing))
        return
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.seq_len = args.seq_len or (2048 if gpu else 256)
    args.batch = args.batch or (8 if gpu else 1)
    args.steps = args.steps or (10 if gpu else 3)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmcycle-scale-out-") as tmp:
        if gpu:
            args.out, args.strategy = tmp, "single"
            summary = summarise_gpu(run_rank(args), args)
            text = table_gpu(summary)
        else:
            runs = {}
            if args.from_checkpoint:  # in its own process, so that its memory is given back before the ranks start
                args.checkpoint = str(Path(tmp) / "checkpoint")
                subprocess.run([sys.executable, __file__, "--shape", args.shape, "--seed", str(args.seed),
                                "--write-checkpoint", args.checkpoint], check=True)
            for strategy in args.strategies.split(","):
                print(f"{strategy}: torchrun --nproc_per_node {args.nproc} ...", file=sys.stderr, flush=True)
                runs[strategy] = launch(strategy, args, Path(tmp))
                r0 = runs[strategy][0]
                print(f"{strategy}: {r0['tokens_per_s']:.1f} tokens/s per rank, peak RSS "
                      f"{max(r['peak_rss_train_mb'] for r in runs[strategy]):.0f} MB, "
                      f"{r0['launch_wall_s']:.0f} s", file=sys.stderr, flush=True)
            summary = summarise_cpu(runs, args)
            text = table_cpu(summary)
    summary["benchmark_wall_s"] = round(time.perf_counter() - started, 1)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
