"""What a labeler submits, and the checks it passes before anything is stored.

A label is either a **ranking with ties**, a list of groups of completion ids, best first (``[["c2"], ["c1",
"c3"]]``: c2 best, c1 and c3 tied below it), that names every completion of the item exactly once; or a
**special label**, ``not_rankable`` or ``unsafe``, with a reason. Either may carry a scalar rating per
completion when the project has a rating scale (e.g. toxicity 0-1), and a comment.

Ranks are dense, as :mod:`lmcycle.data.preferences` reads them: the first group has rank 1, the next rank 2,
however many completions a group holds.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from lmcycle.data.preferences import SPECIAL_LABELS
from lmcycle.errors import LmcycleError

MAX_COMMENT = 10_000  # characters; a comment or reason longer than a page is a paste gone wrong
MAX_REASON = 2_000


@dataclass(frozen=True)
class RatingScale:
    """A project's scalar rating of each completion, e.g. ``RatingScale("toxicity", 0.0, 1.0)``."""

    name: str
    min: float
    max: float

    def __post_init__(self):
        if not self.name.strip():
            raise LmcycleError("a rating scale needs a name", field="rating_scale")
        if not (math.isfinite(self.min) and math.isfinite(self.max) and self.min < self.max):
            raise LmcycleError(f"a rating scale needs finite min < max, got {self.min} and {self.max}",
                               field="rating_scale")


@dataclass(frozen=True)
class Label:
    """One submission's content (who, which item and when are the store's business)."""

    ranking: list[list[str]] | None = None
    special: str | None = None
    reason: str = ""
    ratings: dict[str, float] = field(default_factory=dict)
    comment: str = ""

    @classmethod
    def from_dict(cls, data: Any) -> Label:
        """A label from decoded JSON (``{"ranking": [[...], ...]}`` or ``{"special": ..., "reason": ...}``, plus
        optional ``ratings`` and ``comment``), its types checked; an unknown key or a wrong type is an error
        naming the field."""
        if not isinstance(data, dict):
            raise LmcycleError(f"a label is a JSON object, got {type(data).__name__}", field="label")
        unknown = sorted(set(data) - {"ranking", "special", "reason", "ratings", "comment"})
        if unknown:
            raise LmcycleError("unknown key", field=unknown[0])
        ranking = data.get("ranking")
        if ranking is not None and not (isinstance(ranking, list) and all(
                isinstance(g, list) and all(isinstance(c, str) for c in g) for g in ranking)):
            raise LmcycleError("expected a list of groups (lists) of completion ids", field="ranking")
        for key in ("special", "reason", "comment"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise LmcycleError(f"expected a string, got {type(data[key]).__name__}", field=key)
        ratings = data.get("ratings") or {}
        if not isinstance(ratings, dict):
            raise LmcycleError("expected an object of completion id -> number", field="ratings")
        for cid, value in ratings.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise LmcycleError(f"expected a number, got {type(value).__name__}", field=f"ratings.{cid}")
        return cls(ranking=ranking, special=data.get("special"), reason=data.get("reason") or "",
                   ratings={k: float(v) for k, v in ratings.items()}, comment=data.get("comment") or "")


def check_ranking(groups: Any, completion_ids: list[str], *, field: str = "ranking", file: str | None = None,
                  line: int | None = None) -> list[list[str]]:
    """``groups`` if it is a ranking of exactly ``completion_ids`` (each once, no empty group); otherwise an
    :class:`LmcycleError` naming ``file``, ``line`` and ``field``."""
    def bad(message: str) -> LmcycleError:
        return LmcycleError(message, file=file, line=line, field=field)

    if not isinstance(groups, list) or not groups:
        raise bad("expected a non-empty list of groups of completion ids, best first")
    seen: set[str] = set()
    for i, group in enumerate(groups):
        if not isinstance(group, list) or not group:
            raise bad(f"group {i} is not a non-empty list of completion ids")
        for cid in group:
            if not isinstance(cid, str) or cid not in completion_ids:
                raise bad(f"group {i} names {cid!r:.40}, which is not a completion of this item "
                          f"(its completions: {', '.join(completion_ids)})")
            if cid in seen:
                raise bad(f"completion '{cid}' is ranked twice")
            seen.add(cid)
    missing = [c for c in completion_ids if c not in seen]
    if missing:
        raise bad(f"the ranking skips completion(s) {', '.join(missing)}: rank every completion (ties are allowed)")
    return [list(g) for g in groups]


def check_label(label: Label, completion_ids: list[str], scale: RatingScale | None) -> None:
    """Every rule a label must meet for an item with these completions, under this project's rating scale;
    the first broken one is an :class:`LmcycleError` naming the field."""
    if (label.ranking is None) == (label.special is None):
        raise LmcycleError("give either a ranking or a special label (not_rankable / unsafe), not both or neither",
                           field="ranking" if label.ranking is not None else "special")
    if label.ranking is not None:
        check_ranking(label.ranking, completion_ids)
    else:
        if label.special not in SPECIAL_LABELS:
            raise LmcycleError(f"unknown special label {label.special!r:.40} (known: {', '.join(SPECIAL_LABELS)})",
                               field="special")
        if not label.reason.strip():
            raise LmcycleError(f"a '{label.special}' label needs a reason", field="reason")
    if len(label.reason) > MAX_REASON:
        raise LmcycleError(f"longer than {MAX_REASON} characters", field="reason")
    if len(label.comment) > MAX_COMMENT:
        raise LmcycleError(f"longer than {MAX_COMMENT} characters", field="comment")
    if label.ratings and scale is None:
        raise LmcycleError("this project has no rating scale", field="ratings")
    for cid, value in label.ratings.items():
        if cid not in completion_ids:
            raise LmcycleError(f"'{cid:.40}' is not a completion of this item", field="ratings")
        if not (math.isfinite(value) and scale.min <= value <= scale.max):
            raise LmcycleError(f"{scale.name} rating {value} is outside [{scale.min}, {scale.max}]",
                               field=f"ratings.{cid}")


def ranks_of(groups: list[list[str]]) -> dict[str, int]:
    """Completion id -> dense rank (1 = best; a group shares its rank)."""
    return {cid: rank for rank, group in enumerate(groups, start=1) for cid in group}


def gold_agreement(gold: list[list[str]], ranking: list[list[str]]) -> tuple[int, int]:
    """``(agreed, compared)`` over the completion pairs the gold ranking orders strictly: a pair is agreed when
    the labeler orders it the same way (a tie, or the other order, is a miss)."""
    want, got = ranks_of(gold), ranks_of(ranking)
    agreed = compared = 0
    for a, b in itertools.combinations(sorted(want), 2):
        if want[a] == want[b]:
            continue
        compared += 1
        agreed += (want[a] < want[b]) == (got[a] < got[b]) and got[a] != got[b]
    return agreed, compared
