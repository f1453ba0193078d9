"""The Davidson et al. (2017) tweets labelled hate speech / offensive language / neither, as a 3-way task.

The dataset is one CSV, ``labeled_data.csv`` (24,783 tweets; columns: an unnamed row index, annotator counts,
``class`` = 0 hate, 1 offensive, 2 neither, ``tweet``), with no official split. This module cuts a fixed one:
each class is shuffled with :data:`SPLIT_SEED` and split 80/10/10 (dev and test get ``round(10%)`` of each
class, train the rest), so every split keeps the class balance. On the full file that gives

=====  ======  =========  =======  ======
split  hate    offensive  neither  total
=====  ======  =========  =======  ======
train  1,144   15,352     3,331    19,827
dev    143     1,919      416      2,478
test   143     1,919      416      2,478
=====  ======  =========  =======  ======

Within a split the examples are in a seeded shuffled order (not file order), so a recipe's ``limit`` takes a
roughly stratified sample. The seed is a module constant, not the recipe's ``seed``: a split that moved with the
seed could put a test tweet in another stage's training data.

Targets are the label words :data:`LABELS` (``"hate"``, ``"offensive"``, ``"neither"``); ``meta`` has
``class_id`` and ``label``. The tweet text has its HTML entities (``&amp;``) unescaped and its whitespace
(including line breaks) collapsed to single spaces. The texts are offensive: never print them in tests or logs.
"""

from __future__ import annotations

import html
import random
from pathlib import Path

from lmcycle.data.examples import Example
from lmcycle.data.records import SourceRecord, read_records, text_field
from lmcycle.errors import LmcycleError

FILE_NAME = "labeled_data.csv"
LABELS = ("hate", "offensive", "neither")  # index = the CSV's class id
SPLIT_SEED = 2017
SPLIT_FRACTIONS = {"dev": 0.1, "test": 0.1}  # train gets the rest
SPLIT_NAMES = {"train": "train", "dev": "dev", "validation": "dev", "test": "test", "all": "all"}


def load_davidson(path: str | Path, split: str, seed: int = SPLIT_SEED) -> list[Example]:
    """The examples of one split (``train``, ``dev``/``validation``, ``test`` or ``all``), task ``davidson``.

    ``path`` is the dataset directory or the CSV itself. ``id`` is ``davidson-<row index>`` (the CSV's first
    column). ``all`` is every tweet in file order.
    """
    if split not in SPLIT_NAMES:
        raise LmcycleError(f"unknown Davidson split '{split}' (known: {', '.join(SPLIT_NAMES)})", field="split")
    examples = [_to_example(rec) for rec in read_records(_csv_file(Path(path)), "csv")]
    if SPLIT_NAMES[split] == "all":
        return examples
    return [examples[i] for i in split_indices([ex.meta["class_id"] for ex in examples], seed)[SPLIT_NAMES[split]]]


def split_indices(class_ids: list[int], seed: int = SPLIT_SEED) -> dict[str, list[int]]:
    """Stratified ``train``/``dev``/``test`` positions into ``class_ids``: per class, a seeded shuffle, then
    ``round(fraction * n_class)`` for dev and for test and the rest for train; each split then shuffled."""
    rng = random.Random(seed)
    splits: dict[str, list[int]] = {"train": [], "dev": [], "test": []}
    for class_id in sorted(set(class_ids)):
        members = [i for i, c in enumerate(class_ids) if c == class_id]
        rng.shuffle(members)
        n_dev = round(SPLIT_FRACTIONS["dev"] * len(members))
        n_test = round(SPLIT_FRACTIONS["test"] * len(members))
        splits["dev"] += members[:n_dev]
        splits["test"] += members[n_dev:n_dev + n_test]
        splits["train"] += members[n_dev + n_test:]
    for members in splits.values():
        rng.shuffle(members)
    return splits


def _csv_file(path: Path) -> Path:
    file = path / FILE_NAME if path.is_dir() else path
    if not file.is_file():
        raise LmcycleError(f"Davidson data not found (expected {FILE_NAME} or a path to it)", file=file)
    return file


def _to_example(rec: SourceRecord) -> Example:
    raw = text_field(rec, "class").strip()
    if not raw.isdigit() or int(raw) >= len(LABELS):
        raise LmcycleError(f"unknown class id {raw!r:.20} (known: 0 hate, 1 offensive, 2 neither)",
                           file=rec.file, line=rec.line, field="class")
    class_id = int(raw)
    tweet = " ".join(html.unescape(text_field(rec, "tweet")).split())
    if not tweet:
        raise LmcycleError("empty text", file=rec.file, line=rec.line, field="tweet")
    row = str(rec.data.get("", "")).strip() or str(rec.index)
    return Example(input=tweet, targets=[LABELS[class_id]], task="davidson", id=f"davidson-{row}",
                   meta={"class_id": class_id, "label": LABELS[class_id]})
