"""The Davidson tweets loader: seeded stratified splits on the real file, errors on small files in tmp.

The real tweets are offensive: these tests assert on labels, ids and counts only and never print a text.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from lmcycle.data.davidson import LABELS, load_davidson, split_indices
from lmcycle.data.loaders import DatasetConfig, load_examples
from lmcycle.errors import LmcycleError

SHARED_DAVIDSON = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hate_speech_offensive"
HEADER = ["", "count", "hate_speech", "offensive_language", "neither", "class", "tweet"]


def write_csv(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


def fake_rows(per_class: dict[int, int]) -> list[list]:
    rows, i = [], 0
    for class_id, n in per_class.items():
        for _ in range(n):
            rows.append([i, 3, 0, 0, 3, class_id, f"benign sentence number {i}"])
            i += 1
    return rows


def test_stratified_split_on_a_small_file(tmp_path):
    write_csv(tmp_path / "labeled_data.csv", fake_rows({0: 50, 1: 30, 2: 20}))
    splits = {s: load_davidson(tmp_path, s) for s in ("train", "dev", "test", "all")}
    # 10% of each class (rounded) in dev and in test, the rest in train.
    expected = {"dev": {"hate": 5, "offensive": 3, "neither": 2}, "test": {"hate": 5, "offensive": 3, "neither": 2},
                "train": {"hate": 40, "offensive": 24, "neither": 16}}
    for split, counts in expected.items():
        assert Counter(ex.target for ex in splits[split]) == counts
    ids = {s: [ex.id for ex in exs] for s, exs in splits.items()}
    assert not set(ids["train"]) & set(ids["dev"]) and not set(ids["dev"]) & set(ids["test"])
    assert sorted(ids["train"] + ids["dev"] + ids["test"]) == sorted(ids["all"])
    assert ids["test"] == [ex.id for ex in load_davidson(tmp_path / "labeled_data.csv", "test")]
    for ex in splits["all"]:
        assert ex.target == LABELS[ex.meta["class_id"]] == ex.meta["label"] and ex.task == "davidson"


def test_split_indices_depend_on_the_seed_only():
    classes = [0] * 20 + [1] * 30 + [2] * 10
    a, b, c = split_indices(classes, 1), split_indices(classes, 1), split_indices(classes, 2)
    assert a == b and a != c
    assert sorted(a["train"] + a["dev"] + a["test"]) == list(range(len(classes)))


def test_text_is_unescaped_and_on_one_line(tmp_path):
    path = write_csv(tmp_path / "d.csv", [[0, 3, 0, 0, 3, 2, "fish &amp; chips\n\nat  noon"]])
    (ex,) = load_examples(DatasetConfig(format="davidson", path=str(path), split="all"))
    assert ex.input == "fish & chips at noon" and ex.target == "neither" and ex.id == "davidson-0"


@pytest.mark.parametrize("value", ["3", "-1", "x", "1.0"])
def test_unknown_class_names_file_line_and_field(tmp_path, value):
    path = write_csv(tmp_path / "d.csv", [*fake_rows({1: 2}), [9, 3, 0, 0, 3, value, "some text"]])
    with pytest.raises(LmcycleError, match="unknown class id") as err:
        load_davidson(path, "all")
    assert (err.value.file, err.value.line, err.value.field) == (str(path), 4, "class")


def test_other_bad_input(tmp_path):
    with pytest.raises(LmcycleError, match="not found"):
        load_davidson(tmp_path, "train")  # the directory has no labeled_data.csv
    empty_tweet = write_csv(tmp_path / "e.csv", [*fake_rows({2: 1}), [1, 3, 0, 0, 3, 2, "   "]])
    with pytest.raises(LmcycleError, match="empty") as err:
        load_davidson(empty_tweet, "all")
    assert (err.value.line, err.value.field) == (3, "tweet")
    short_row = tmp_path / "s.csv"
    short_row.write_text(",".join(HEADER) + "\n0,3,0,0,3,2,fine\n1,3,0\n", encoding="utf-8")
    with pytest.raises(LmcycleError, match="header has 7 columns") as err:
        load_davidson(short_row, "all")
    assert err.value.line == 3
    no_class = tmp_path / "n.csv"
    no_class.write_text(",tweet\n0,fine\n", encoding="utf-8")
    with pytest.raises(LmcycleError, match="missing field") as err:
        load_davidson(no_class, "all")
    assert (err.value.line, err.value.field) == (2, "class")
    with pytest.raises(LmcycleError, match="unknown Davidson split"):
        load_davidson(short_row, "heldout")


@pytest.mark.shared_data
def test_real_davidson_splits_are_stratified_disjoint_and_fixed():
    if not (SHARED_DAVIDSON / "labeled_data.csv").is_file():
        pytest.skip(reason=f"shared Davidson copy not found at {SHARED_DAVIDSON}")
    everything = load_davidson(SHARED_DAVIDSON, "all")
    per_class = Counter(ex.target for ex in everything)
    assert per_class == {"hate": 1430, "offensive": 19190, "neither": 4163}
    splits = {s: load_davidson(SHARED_DAVIDSON, s) for s in ("train", "dev", "test")}
    for split in ("dev", "test"):
        assert Counter(ex.target for ex in splits[split]) == {k: round(0.1 * n) for k, n in per_class.items()}
    assert {s: len(e) for s, e in splits.items()} == {"train": 19827, "dev": 2478, "test": 2478}
    ids = {s: {ex.id for ex in e} for s, e in splits.items()}
    assert sum(map(len, ids.values())) == len(everything) == len(ids["train"] | ids["dev"] | ids["test"])
    # Fixed: loading again (through the recipe path, with a different recipe seed) gives the same order.
    again = load_examples(DatasetConfig(format="davidson", path=str(SHARED_DAVIDSON), split="test", seed=7))
    assert [ex.id for ex in again] == [ex.id for ex in splits["test"]]
    assert all(ex.meta["class_id"] in (0, 1, 2) and ex.input for ex in everything)
