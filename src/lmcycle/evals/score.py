"""The result of every metric: the numbers, the settings that produced them, and the per-example values.

Every metric also names its settings in one short string, sacrebleu-style (:class:`Signature`), e.g.
``rouge|agg:max|refs:3|stem:porter|lsum:split-sentences|tok:default|v:0.1.2``: two numbers are comparable
when their signatures are equal. ``v`` is the version of what computed the number: rouge-score, sacrebleu,
or lmcycle itself for the metrics implemented here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Signature:
    """A metric's settings as ordered short ``(key, value)`` pairs, written ``metric|key:value|...|v:version``.

    Equal settings give equal signatures and equal strings; :meth:`parse` reads the string back. A key holds
    neither ``:`` nor ``|`` and is never ``v`` (the version's); a value holds no ``|``. With ``sacrebleu`` set,
    the string is sacrebleu's own (no metric name, ``version:`` last), so BLEU's signature stays the one
    sacrebleu prints and papers quote.
    """

    metric: str
    keys: tuple[tuple[str, str], ...]
    version: str
    sacrebleu: bool = False

    def __post_init__(self) -> None:
        if not self.metric or set(self.metric) & {":", "|"}:
            raise ValueError(f"signature: bad metric name {self.metric!r}")
        names = [k for k, _ in self.keys]
        if len(set(names)) != len(names):
            raise ValueError(f"signature: a key repeats in {names}")
        for key, value in self.keys:
            if not key or set(key) & {":", "|"} or key in ("v", "version"):
                raise ValueError(f"signature: bad key {key!r}")
            if not isinstance(value, str) or "|" in value:
                raise ValueError(f"signature: bad value {value!r} of key {key!r}")
        if "|" in self.version:
            raise ValueError(f"signature: bad version {self.version!r}")

    @classmethod
    def of(cls, metric: str, version: str, **keys: Any) -> Signature:
        """The signature of ``metric`` at ``version`` with ``keys`` in the order given; a bool value is written
        ``yes``/``no`` and None ``none`` (sacrebleu's spelling), anything else with ``str``."""
        return cls(metric, tuple((k, _text(v)) for k, v in keys.items()), version)

    @classmethod
    def parse(cls, text: str) -> Signature:
        """The signature a ``metric|key:value|...|v:version`` string was written from."""
        parts = text.split("|")
        if len(parts) < 2 or not parts[-1].startswith("v:"):
            raise ValueError(f"not a signature (metric|key:value|...|v:version): {text!r}")
        return cls(parts[0], _pairs(parts[1:-1], text), parts[-1].removeprefix("v:"))

    @classmethod
    def from_sacrebleu(cls, metric: str, text: str) -> Signature:
        """``metric``'s signature from sacrebleu's signature string (``key:value|...|version:x``)."""
        parts = text.split("|")
        if not parts[-1].startswith("version:"):
            raise ValueError(f"not a sacrebleu signature (key:value|...|version:x): {text!r}")
        return cls(metric, _pairs(parts[:-1], text), parts[-1].removeprefix("version:"), sacrebleu=True)

    def as_dict(self) -> dict[str, str]:
        """The short keys and their values, the version under ``v``."""
        return {**dict(self.keys), "v": self.version}

    def __str__(self) -> str:
        pairs = [f"{k}:{v}" for k, v in self.keys]
        if self.sacrebleu:
            return "|".join([*pairs, f"version:{self.version}"])
        return "|".join([self.metric, *pairs, f"v:{self.version}"])


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "none" if value is None else str(value)


def _pairs(fields: list[str], text: str) -> tuple[tuple[str, str], ...]:
    if not all(":" in f for f in fields):
        raise ValueError(f"a signature field is not key:value in {text!r}")
    return tuple(tuple(f.split(":", 1)) for f in fields)  # type: ignore[misc]


def ref_count(references: list[list[str]]) -> str:
    """References per example for a signature: the number when every example has as many, else ``var``
    (sacrebleu's ``nrefs``)."""
    counts = {len(refs) for refs in references}
    return str(counts.pop()) if len(counts) == 1 else "var"


@dataclass
class Score:
    """A metric's result.

    ``values`` are the aggregate numbers (e.g. ``{"rougeL": 31.2}``), ``settings`` say exactly how they were
    computed (package and version, tokenizer, multi-reference rule, aggregation, ...) so that every reported
    number travels with what produced it, and ``per_example`` holds one dict of values per input, in order.
    ``signature`` names the settings in short; it is recorded in ``settings`` as ``signature`` (the string) and
    ``keys`` (the short keys and their values).
    """

    values: dict[str, float]
    settings: dict[str, Any]
    per_example: list[dict[str, float]] = field(default_factory=list)
    signature: Signature | None = None

    def __post_init__(self) -> None:
        if self.signature is not None:
            self.settings = {**self.settings, "signature": str(self.signature), "keys": self.signature.as_dict()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
