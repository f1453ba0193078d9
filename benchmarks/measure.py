"""What every benchmark here measures the same way: the process's memory, the machine's load, step times.

Imported by the scripts in this folder (run as ``python benchmarks/<script>.py``, which puts this folder on
``sys.path``). Linux: memory comes from ``/proc`` and ``getrusage``.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from pathlib import Path

# Printed under a table when a counted run did not have its cores to itself.
BUSY_WARNING = ("\nWARNING: a best run had less than 95% of its cores (CPU share): other work was running, "
                "the wall-clock numbers are not reliable; run again on an idle machine.")


def rss_mb(field: str = "VmRSS") -> float:
    """Current resident memory of this process in MiB (Linux): ``VmRSS``, or its parts ``RssAnon`` (the
    process's own memory) and ``RssFile`` (pages of mapped files, e.g. safetensors being read)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """``ru_maxrss`` of this process in MiB (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> float:
    """1-minute load average: how busy the (shared) machine was; above the core count means contention."""
    with open("/proc/loadavg", encoding="ascii") as f:
        return float(f.read().split()[0])


def version(pkg: str) -> str:
    from importlib.metadata import version as _version

    return _version(pkg)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Clock:
    """Wall and CPU start times of optimizer steps; the process's peak RSS at the start of the last step."""

    def __init__(self, warmup: int, steps: int):
        self.first, self.last = warmup, warmup + steps
        self.times: dict[int, float] = {}
        self.cpu_times: dict[int, float] = {}
        self.peak_rss = float("nan")

    def step_starts(self, step: int) -> None:
        self.times.setdefault(step, time.perf_counter())
        self.cpu_times.setdefault(step, time.process_time())
        if step == self.last:
            self.peak_rss = peak_rss_mb()

    def window(self) -> float:
        return self.times[self.last] - self.times[self.first]

    def cpu_window(self) -> float:
        """CPU seconds of all threads of the process in the window: less sensitive to other work on the machine
        than wall time (exactly so with one thread; idle threads spinning while they wait count too)."""
        return self.cpu_times[self.last] - self.cpu_times[self.first]

    def median_step(self) -> float:
        """Median duration of the timed steps: robust to bursts of other work on a shared machine."""
        return statistics.median(self.times[s + 1] - self.times[s] for s in range(self.first, self.last))


def trainer_clock(clock: Clock, losses: list[float] | None = None):
    """A transformers ``TrainerCallback`` that starts ``clock``'s step timers and appends each logged loss to
    ``losses``: how every benchmark times a peer's Trainer the way it times our loop."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.step_starts(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if losses is not None and logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return StepClock()
