"""CPU latency, throughput, size and memory of optimized models against the unoptimized one, in one run.

    python benchmarks/optimize_latency.py --original RUN/classifier/model \\
        --variant distilled=RUN/distill/model --variant int8=RUN/int8/model --json optimize.json

Every row is measured by ``lmcycle.optimize.compare.measure`` in a fresh process (peak memory is that model's
alone), on the same eval texts (Davidson test and DynaHate test from ``../shared/data`` by default, their quality
scored too) and the same thread count. The peer row applies ``torch.ao.quantization.quantize_dynamic`` (int8
weights, dynamic int8 activations, the deprecated PyTorch API users call today) to the original in its process.
With ``--repeats R`` every row is measured R times in alternating order and the run with the lowest batch-1 p50
counts: the machine is often shared. The 1-minute load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import cpu_name, load_average, version

ROOT = Path(__file__).resolve().parents[1]
PEER = "torch.ao quantize_dynamic (peer)"


def eval_data(args: argparse.Namespace) -> dict[str, list[dict]]:
    """The labelled eval texts: ``{dataset: [{"input", "targets"}]}`` (toxic / not_toxic labels)."""
    from lmcycle.data.davidson import load_davidson
    from lmcycle.data.dynahate import load_dynahate

    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        sys.exit(f"no data at {data_dir}: pass --data-dir")
    sets = {"davidson_test": load_davidson(data_dir / "hate_speech_offensive", "test"),
            "dynahate_test": load_dynahate(data_dir / "dynahate", "test")}
    return {name: [{"input": ex.input, "targets": list(ex.targets), "id": ex.id} for ex in exs[:args.n_eval]]
            for name, exs in sets.items()}


def compare_cfg(args: argparse.Namespace):
    from lmcycle.optimize.compare import MeasureConfig

    return MeasureConfig(max_len=args.max_len, latency_runs=args.runs, warmup=args.warmup, batch_size=args.batch,
                         throughput_batches=args.batches, threads=args.threads, compile=args.compile,
                         label_map={"hate": "toxic", "offensive": "toxic", "neither": "not_toxic",
                                    "nothate": "not_toxic"})


def peer_dynamic_int8(model):
    """The peer: torch.ao's dynamic int8 quantization of every nn.Linear; its state dict's size on disk."""
    import torch

    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        torch.save(quantized.state_dict(), f.name)
        size = Path(f.name).stat().st_size
    return quantized, size


def child(spec_file: str, out_file: str) -> None:
    """One measurement in this fresh process (started by :func:`measure_row`)."""
    import lmcycle.models.classifier  # noqa: F401  (imports before the memory baseline, as compare's child does)
    from lmcycle.optimize.compare import MeasureConfig, count_parameters, load_for_compare, measure

    spec = json.loads(Path(spec_file).read_text())
    prepare = peer_dynamic_int8 if spec["peer"] else None
    row = measure(spec["model"], spec["data"], MeasureConfig.model_validate(spec["cfg"]), prepare=prepare)
    if spec["peer"]:  # torch.ao's packed int8 weights are not parameters: count the model it quantized
        row["params"] = count_parameters(load_for_compare(spec["model"])[0])[0]
    Path(out_file).write_text(json.dumps(row))


def measure_row(model: str, peer: bool, data: dict, cfg) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"model": model, "peer": peer, "data": data, "cfg": cfg.model_dump(mode="json")}))
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec), str(out)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            sys.exit(f"measuring {model} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--original", help="the unoptimized sequence classifier folder")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR")
    p.add_argument("--no-peer", action="store_true", help="skip the torch.ao quantize_dynamic row")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--n-eval", type=int, default=None, help="examples per eval dataset (default: all)")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile every model before timing")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    if not args.original:
        p.error("--original is required")

    from lmcycle.optimize.compare import with_ratios

    data, cfg = eval_data(args), compare_cfg(args)
    entries = [("original (fp32)", args.original, False)]
    entries += [(label, path, False) for label, path in (v.split("=", 1) for v in args.variant)]
    if not args.no_peer:
        entries.append((PEER, args.original, True))
    best: dict[str, dict] = {}
    loads = []
    for r in range(args.repeats):
        for label, path, peer in (entries if r % 2 == 0 else entries[::-1]):
            row = measure_row(path, peer, data, cfg)
            loads.append(load_average())
            print(f"  {label}: p50 {row['latency_p50_ms']:.2f} ms, {row['throughput']:.0f} ex/s", file=sys.stderr)
            if label not in best or row["latency_p50_ms"] < best[label]["latency_p50_ms"]:
                best[label] = {"label": label, "model": path, **row}
    rows = with_ratios([best[label] for label, _, _ in entries])
    print_table(rows, args, max(loads))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args), "max_load": max(loads)}, indent=2))


def print_table(rows: list[dict], args: argparse.Namespace, max_load: float) -> None:
    import torch

    metrics = [k for k in rows[0]["quality"] if k.endswith("macro_f1")]
    print(f"\n{cpu_name()}; torch {torch.__version__}, transformers {version('transformers')}, torchao "
          f"{version('torchao')}; {args.threads} threads; {'torch.compile' if args.compile else 'eager'}; "
          f"max_len {args.max_len}; batch-1 latency over {args.runs} eval texts, throughput at batch {args.batch}; "
          f"best of {args.repeats}; max 1-min load average {max_load:.2f}\n")
    print("| model | " + " | ".join(metrics) + " | params | size MB | × size | loaded MB | peak MB | p50 ms | p95 ms | × speed b1 "
          "| ex/s b32 | × throughput |")
    print("|---|" + "---:|" * (len(metrics) + 10))
    for r in rows:
        q = " | ".join(f"{r['quality'][m]:.2f}" for m in metrics)
        print(f"| {r['label']} | {q} | {r['params'] / 1e6:.2f}M | {r['size_bytes'] / 1e6:.1f} | {r['size_ratio']:.2f} "
              f"| {r['loaded_memory_mb']:.0f} | {r['peak_memory_mb']:.0f} | {r['latency_p50_ms']:.2f} | {r['latency_p95_ms']:.2f} "
              f"| {r['speedup_b1']:.2f} | {r['throughput']:.0f} | {r['speedup_throughput']:.2f} |")


if __name__ == "__main__":
    main()
