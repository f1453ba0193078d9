"""Labels out of the store: the ``rankings`` format that ``data: {format: rankings}`` reads, or plain JSON
Lines with everything stored.

``rankings``: one line per live (not undone) label, in submission order, with the fields
:func:`lmcycle.data.preferences.load_rankings` reads (``prompt_id``, ``prompt``, ``completions`` as texts in the
item's file order, ``ranks``: the dense rank of each, 1 = best, ties equal; ``labeler``; ``special`` with
``ranks`` null) and, beside them, what that loader skips but a reader may want: ``completion_ids``, ``models``,
``ratings`` (one per completion, null where not rated), ``reason``, ``comment``, ``guideline_version``,
``gold`` (whether it is a gold item), ``shown_at`` and ``submitted_at``.

``jsonl``: one line per live label with the stored record as it is (the ranking as groups of completion ids)
and the item it labels (prompt, completions with their models and decoding settings, the gold ranking).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmcycle.atomic import atomic_write_text
from lmcycle.errors import LmcycleError
from lmcycle.feedback.labels import ranks_of
from lmcycle.feedback.store import Snapshot

EXPORT_FORMATS = ("rankings", "jsonl")


def rankings_rows(snap: Snapshot) -> list[dict[str, Any]]:
    """The project's live labels as ``rankings`` rows (see the module docstring)."""
    items = {item.id: item for item in snap.items}
    rows = []
    for label in snap.labels:
        item = items[label.item_id]
        ids = [c.id for c in item.completions]
        ranks = None if label.ranking is None else [ranks_of(label.ranking)[cid] for cid in ids]
        rows.append({"prompt_id": item.prompt_id, "prompt": item.prompt,
                     "completions": [c.text for c in item.completions], "ranks": ranks, "labeler": label.labeler,
                     "special": label.special, "completion_ids": ids, "models": [c.model for c in item.completions],
                     "ratings": [label.ratings.get(cid) for cid in ids] if label.ratings else None,
                     "reason": label.reason, "comment": label.comment, "guideline_version": label.guideline_version,
                     "gold": item.gold is not None, "shown_at": label.shown_at, "submitted_at": label.submitted_at})
    return rows


def jsonl_rows(snap: Snapshot) -> list[dict[str, Any]]:
    """The project's live labels as stored, each with its item (see the module docstring)."""
    items = {item.id: item for item in snap.items}
    return [{"project": snap.project.name, **asdict(label), "item": asdict(items[label.item_id])}
            for label in snap.labels]


def write_export(snap: Snapshot, out: str | Path, format: str = "rankings") -> int:
    """Write the project's labels to ``out`` (atomically: a reader never sees half a file); returns the rows.
    A project with no labels yet is an error rather than an empty file that the rankings loader refuses."""
    if format not in EXPORT_FORMATS:
        raise LmcycleError(f"unknown export format '{format}' (known: {', '.join(EXPORT_FORMATS)})", field="format")
    rows = rankings_rows(snap) if format == "rankings" else jsonl_rows(snap)
    if not rows:
        raise LmcycleError(f"project '{snap.project.name}' has no labels to export yet", field="project")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)
