"""Progress and quality of a labeling project: done / left per labeler and overall, accuracy on gold items,
too-fast submissions.

- **left**, per labeler: the items they hold open plus those they could still be given (a free slot, never
  theirs); overall: label slots (the items' overlaps summed) minus live labels.
- **gold accuracy**: over the completion pairs that gold items' known rankings order strictly, the share the
  labeler ordered the same way (a tie or the reverse order is a miss); special labels on gold items are
  counted apart (``gold_special``), not as misses.
- **too fast**: a label submitted less than ``too_fast_s`` seconds after its item was shown (the project's
  setting unless given), measured on the store's clock.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from lmcycle.feedback.labels import gold_agreement
from lmcycle.feedback.store import Snapshot


def project_stats(snap: Snapshot, too_fast_s: float | None = None) -> dict[str, Any]:
    """``{"project", "too_fast_s", "overall": {...}, "labelers": [{...} per labeler, by name]}``; a labeler is
    every account with the labeler role and anyone else who was given an item."""
    threshold = snap.project.too_fast_s if too_fast_s is None else too_fast_s
    items = {item.id: item for item in snap.items}
    holders: dict[int, set[str]] = {item.id: set() for item in snap.items}
    for item_id, name in snap.assignments:
        holders[item_id].add(name)
    names = sorted({u.name for u in snap.users if u.role == "labeler"} | {n for _, n in snap.assignments})
    rows = []
    for name in names:
        mine = [lab for lab in snap.labels if lab.labeler == name]
        labelled = {lab.item_id for lab in mine}
        held = {item_id for item_id, n in snap.assignments if n == name}
        available = [i for i, who in holders.items() if name not in who and len(who) < items[i].overlap]
        agreed = compared = gold_special = gold_labels = 0
        for lab in mine:
            gold = items[lab.item_id].gold
            if gold is None:
                continue
            gold_labels += 1
            if lab.ranking is None:
                gold_special += 1
                continue
            a, c = gold_agreement(gold, lab.ranking)
            agreed, compared = agreed + a, compared + c
        rows.append({"labeler": name, "done": len(mine), "left": len(held - labelled) + len(available),
                     "special": dict(Counter(lab.special for lab in mine if lab.special)),
                     "gold_labels": gold_labels, "gold_special": gold_special,
                     "gold_accuracy": agreed / compared if compared else None,
                     "too_fast": sum(lab.seconds < threshold for lab in mine),
                     "median_seconds": statistics.median(lab.seconds for lab in mine) if mine else None})
    per_item = Counter(lab.item_id for lab in snap.labels)
    needed = sum(item.overlap for item in snap.items)
    overall = {"items": len(snap.items), "gold_items": sum(item.gold is not None for item in snap.items),
               "items_complete": sum(per_item[item.id] >= item.overlap for item in snap.items),
               "labels_needed": needed, "done": len(snap.labels), "left": needed - len(snap.labels),
               "too_fast": sum(lab.seconds < threshold for lab in snap.labels)}
    return {"project": snap.project.name, "too_fast_s": threshold, "overall": overall, "labelers": rows}
