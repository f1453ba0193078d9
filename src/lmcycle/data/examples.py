"""The unit every task is made of."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One task example: an input text and one or more reference targets.

    ``targets[0]`` is what fine-tuning trains on; every target is a reference when scoring (DialogSum's test
    split has three per dialogue).
    """

    input: str
    targets: list[str]
    task: str = "default"
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.targets[0]
