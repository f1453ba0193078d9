"""Measured matmul peak of this machine: the denominator of MFU.

    python benchmarks/matmul_peak.py                  # fp32 and bf16, sizes 1024 1536 2048, all threads
    python benchmarks/matmul_peak.py --sizes 2048 --repeats 10 --json peak.json

Peak = best over sizes and repeats of 2·n³ / seconds for one ``torch.matmul`` of two n×n matrices. "Best of"
rather than mean because the machine is shared: the fastest run is the one least disturbed by other work.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int) -> float:
    """Best GFLOP/s of ``a @ b`` with ``a, b: [n, n]`` of ``dtype`` over ``repeats`` timed runs (after warmup)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):  # warmup: thread pool start, oneDNN/MKL kernel selection
        torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def measure_peak(dtypes=("fp32", "bf16"), sizes=(1024, 1536, 2048), repeats: int = 5) -> dict:
    """Measured peak GFLOP/s per dtype: ``{"fp32": {"peak_gflops": x, "by_size": {n: x}}, ..., "threads": t}``."""
    result: dict = {"threads": torch.get_num_threads()}
    for name in dtypes:
        by_size = {n: matmul_gflops(n, DTYPES[name], repeats) for n in sizes}
        result[name] = {"peak_gflops": max(by_size.values()), "by_size": by_size}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 1536, 2048])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default, all cores)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = measure_peak(args.dtypes, args.sizes, args.repeats)
    print(f"torch {torch.__version__}, {peak['threads']} threads, best of {args.repeats}")
    print("| dtype | " + " | ".join(f"n={n}" for n in args.sizes) + " | peak GFLOP/s |")
    print("|---" * (len(args.sizes) + 2) + "|")
    for name in args.dtypes:
        row = " | ".join(f"{peak[name]['by_size'][n]:.1f}" for n in args.sizes)
        print(f"| {name} | {row} | **{peak[name]['peak_gflops']:.1f}** |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(peak, f, indent=2)


if __name__ == "__main__":
    main()
