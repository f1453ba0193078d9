"""The unit every task is made of."""

from __future__ import annotations

from collections.abc import Iterable
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


def plain_texts(examples: Iterable[Example]) -> list[str]:
    """Every non-blank input and target of ``examples``, each one text: how pre-training reads a corpus, and how
    pruning, distillation and ``compare`` score or train a language model on a dataset."""
    return [t for ex in examples for t in (ex.input, *ex.targets) if t.strip()]
