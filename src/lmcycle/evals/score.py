"""The result of every metric: the numbers, the settings that produced them, and the per-example values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Score:
    """A metric's result.

    ``values`` are the aggregate numbers (e.g. ``{"rougeL": 31.2}``), ``settings`` say exactly how they were
    computed (package and version, tokenizer, multi-reference rule, aggregation, ...) so that every reported
    number travels with what produced it, and ``per_example`` holds one dict of values per input, in order.
    """

    values: dict[str, float]
    settings: dict[str, Any]
    per_example: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
