"""Start-to-result latency of one PAL program: lmcycle's sandbox vs the plain ways of running it.

Sides, each run ``--runs`` times in an interleaved order (so that load changes hit all sides alike):

- ``sandbox``: :func:`lmcycle.apps.sandbox.run_solution` (AST pre-filter, ``python -I -S`` child, rlimits, uid
  drop, Landlock, seccomp, namespaces where available, JSON result).
- ``subprocess``: ``subprocess.run([sys.executable, "-c", code + print(solution())])``, no isolation: the usual
  peer baseline (a separate process, nothing else).
- ``in_process``: ``exec`` in this process (what LangChain PALChain / smolagents' local executor do; no boundary).

Prints p50/p95 per side and the ratios sandbox / baseline. ~10 s with the default 40 runs.

    PYTHONPATH=src python benchmarks/sandbox_latency.py [--runs 40]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from measure import load_average

from lmcycle.apps.sandbox import SandboxConfig, active_layers, run_solution

PROGRAM = """import math
def solution():
    eggs = 16 - 3 - 4
    dollars = eggs * 2
    return math.floor(dollars * 1.0)
"""


def run_sandbox(cfg: SandboxConfig) -> float:
    start = time.perf_counter()
    result = run_solution(PROGRAM, cfg)
    assert result.ok and result.value == 18, result
    return time.perf_counter() - start


def run_subprocess() -> float:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROGRAM + "print(solution())"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "18"
    return time.perf_counter() - start


def run_in_process() -> float:
    start = time.perf_counter()
    ns: dict = {}
    exec(compile(PROGRAM, "<program>", "exec"), ns)  # noqa: S102 - the unprotected baseline being measured
    assert ns["solution"]() == 18
    return time.perf_counter() - start


def quantiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=20)
    return statistics.median(xs), q[18]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    cfg = SandboxConfig()
    layers = active_layers()
    sides = {"sandbox": lambda: run_sandbox(cfg), "subprocess": run_subprocess, "in_process": run_in_process}
    for side in sides.values():  # warm-up: page cache, imports
        side()
    times: dict[str, list[float]] = {name: [] for name in sides}
    load = []
    for _ in range(args.runs):
        for name, side in sides.items():
            times[name].append(side())
        load.append(load_average())
    print(f"python {sys.version.split()[0]}, {args.runs} runs per side, 1-min load average "
          f"{statistics.mean(load):.2f}")
    print("active sandbox layers: " + ", ".join(layers))
    print(f"{'side':<12} {'p50 ms':>9} {'p95 ms':>9}")
    stats = {name: quantiles(ts) for name, ts in times.items()}
    for name, (p50, p95) in stats.items():
        print(f"{name:<12} {p50 * 1e3:9.2f} {p95 * 1e3:9.2f}")
    s50, s95 = stats["sandbox"]
    for base in ("subprocess", "in_process"):
        b50, b95 = stats[base]
        print(f"sandbox / {base}: p50 x{s50 / b50:.1f}, p95 x{s95 / b95:.1f}")


if __name__ == "__main__":
    main()
