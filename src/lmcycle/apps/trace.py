"""Traces: what an agent or a chain did, step by step, as JSON (the ReAct loop records into one).

Chains are plain composition: a list of named functions, each taking the previous one's output.

    answer = chain(("prompt", make_prompt), ("llm", lambda p: llm.complete([p], cfg)[0]), ("parse", parse))
    trace = Trace()
    answer("What is 2 + 2?", trace=trace)
    trace.save("trace.json")

No classes to subclass and nothing hidden: a failing step raises its own exception, and the trace holds every
step's input, output and time, as JSON, for debugging what the model actually saw.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcycle.atomic import atomic_write_text


@dataclass
class Trace:
    """What a chain or an agent did, step by step (JSON-serialisable)."""

    steps: list[dict[str, Any]] = field(default_factory=list)

    def record(self, step: str, **data: Any) -> None:
        self.steps.append({"step": step, **data})

    def to_json(self) -> str:
        return json.dumps({"steps": self.steps}, ensure_ascii=False, indent=1, default=str)

    def save(self, path: str | Path) -> Path:
        """Write the trace atomically (a reader never sees half a file)."""
        path = Path(path)
        atomic_write_text(path, self.to_json() + "\n")
        return path


def chain(*steps: tuple[str, Callable[[Any], Any]]) -> Callable[..., Any]:
    """Compose named one-argument functions left to right; the result takes ``(value, trace=None)``."""

    def run(value: Any, trace: Trace | None = None) -> Any:
        for name, fn in steps:
            start = time.perf_counter()
            out = fn(value)
            if trace is not None:
                trace.record(name, input=value, output=out, seconds=round(time.perf_counter() - start, 6))
            value = out
        return value

    return run
