"""Labels out of the store: the ``rankings`` format that ``data: {format: rankings}`` reads, or plain JSON
Lines with everything stored.

``rankings``: one line per live (not undone) label, by item (import order) then labeler name, so that the
same labels always give the same file and the same training order, however the labelers' submissions
interleaved (:func:`label_order`); with the fields
:func:`lmcycle.data.preferences.load_rankings` reads (``prompt_id``, ``prompt``, ``completions`` as texts in the
item's file order, ``ranks``: the dense rank of each, 1 = best, ties equal; ``labeler``; ``special`` with
``ranks`` null) and, beside them, what that loader skips but a reader may want: ``completion_ids``, ``models``,
``ratings`` (one per completion, null where not rated), ``reason``, ``comment``, ``guideline_version``,
``gold`` (whether it is a gold item), ``shown_at`` and ``submitted_at``.

``jsonl``: one line per live label with the stored record as it is (the ranking as groups of completion ids)
and the item it labels (prompt, completions with their models and decoding settings, the gold ranking).

``hf``: the ``rankings`` rows as a Hugging Face dataset folder (``datasets.Dataset.from_list(rows)
.save_to_disk``; read it back with ``datasets.load_from_disk``), written beside and renamed into place.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmcycle.atomic import atomic_dir, atomic_write_text
from lmcycle.data.preferences import Ranking
from lmcycle.errors import LmcycleError
from lmcycle.feedback.labels import ranks_of
from lmcycle.feedback.store import Snapshot

EXPORT_FORMATS = ("rankings", "jsonl", "hf")


def rankings_rows(snap: Snapshot) -> list[dict[str, Any]]:
    """The project's live labels as ``rankings`` rows (see the module docstring)."""
    items = {item.id: item for item in snap.items}
    rows = []
    for label in label_order(snap):
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


def label_order(snap: Snapshot) -> list:
    """The live labels by item (import order), then labeler name: an order that does not depend on who
    submitted first (submission order does, and a reward model trained on it would not be reproducible)."""
    position = {item.id: i for i, item in enumerate(snap.items)}
    return sorted(snap.labels, key=lambda label: (position[label.item_id], label.labeler))


def rankings_from_snapshot(snap: Snapshot) -> tuple[list[Ranking], dict[str, list[int]]]:
    """``(rankings, gold)``: the project's live labels as :class:`~lmcycle.data.preferences.Ranking` objects
    (the ``rankings`` rows, ratings included), and each gold item's known ranking as dense ranks in the item's
    completion order, by prompt id (the order the rankings list the completions in)."""
    rankings = [Ranking(r["prompt_id"], r["prompt"], r["completions"],
                        r["ranks"] if r["ranks"] is not None else [None] * len(r["completions"]),
                        r["labeler"], r["special"], r["ratings"]) for r in rankings_rows(snap)]
    gold = {}
    for item in snap.items:
        if item.gold is not None:
            ranks = ranks_of(item.gold)
            gold[item.prompt_id] = [ranks[c.id] for c in item.completions]
    return rankings, gold


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
    rows = jsonl_rows(snap) if format == "jsonl" else rankings_rows(snap)
    if not rows:
        raise LmcycleError(f"project '{snap.project.name}' has no labels to export yet", field="project")
    if format == "hf":
        save_hf_dataset(rows, out)
    else:
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def save_hf_dataset(rows: list[dict[str, Any]], out: str | Path) -> None:
    """``rows`` as a ``datasets`` folder at ``out``, written to a temporary folder beside it and renamed into
    place (:func:`lmcycle.atomic.atomic_dir`). An ``out`` that exists must be a saved dataset (it is replaced
    whole): any other folder is refused rather than deleted."""
    try:
        import datasets  # lazy: pyarrow and pandas, for this format only
    except ImportError:
        raise LmcycleError('the hf export needs the datasets library: pip install "lmcycle[data]"',
                           field="format") from None
    out = Path(out)
    if out.exists() and not (out / "state.json").is_file():
        raise LmcycleError("exists and is not a saved dataset (it would be replaced whole); choose another --out",
                           file=out, field="out")
    with atomic_dir(out) as tmp:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
