"""The DynaHate loader: tiny CSVs written here (format, ids, errors naming file/line/field) and the real counts.

The real texts are hateful by design: these tests assert on labels, ids and counts only and never print a text.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from lmcycle.data.dynahate import load_dynahate
from lmcycle.data.loaders import DatasetConfig, load_examples
from lmcycle.errors import LmcycleError

SHARED_DYNAHATE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dynahate"
HEADER = ["Unnamed: 0", "acl.id", "X1", "text", "label", "type", "target", "level", "split", "round.base",
          "annotator", "round", "acl.id.matched", "text_len"]


def row(i: int, label: str, text: str | None = None, acl_id: str | None = None) -> list:
    text = text if text is not None else f"a  harmless\nsentence {i}"
    return [i, acl_id or f"acl{i}", i, text, label, "none", "none", "original", "dev", 1 + i % 4, "ann", "1", "",
            len(text.split())]


def write_csv(path: Path, rows: list[list], header: list[str] = HEADER) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_splits_from_a_directory(tmp_path):
    write_csv(tmp_path / "db_dev.csv", [row(0, "hate"), row(1, "nothate"), row(2, "hate")])
    write_csv(tmp_path / "db_test.csv", [row(10, "nothate"), row(11, "hate")])
    dev = load_dynahate(tmp_path, "dev")
    assert [ex.id for ex in dev] == ["acl0", "acl1", "acl2"]  # file order
    assert [ex.targets for ex in dev] == [["hate"], ["nothate"], ["hate"]]
    assert dev[0].input == "a harmless sentence 0" and dev[0].task == "dynahate"  # whitespace collapsed
    assert dev[1].meta == {"label": "nothate", "round": "2", "type": "none", "target": "none"}
    assert [ex.id for ex in load_dynahate(tmp_path, "validation")] == [ex.id for ex in dev]
    assert [ex.id for ex in load_dynahate(tmp_path, "test")] == ["acl10", "acl11"]
    # A file path is read as it is; the named format goes through the same loader with limit.
    assert [ex.id for ex in load_dynahate(tmp_path / "db_test.csv", "dev")] == ["acl10", "acl11"]
    cfg = DatasetConfig(format="dynahate", path=str(tmp_path), split="dev", limit=2)
    assert [ex.id for ex in load_examples(cfg)] == ["acl0", "acl1"]


def test_errors_name_file_line_and_field(tmp_path):
    bad_label = write_csv(tmp_path / "a.csv", [row(0, "hate"), row(1, "maybe")])
    with pytest.raises(LmcycleError, match="unknown label 'maybe'") as err:
        load_dynahate(bad_label, "dev")
    # Line 4: the header is line 1 and the first record's quoted text spans lines 2-3.
    assert (err.value.file, err.value.line, err.value.field) == (str(bad_label), 4, "label")

    empty_text = write_csv(tmp_path / "b.csv", [row(0, "hate", text="   ")])
    with pytest.raises(LmcycleError, match="empty text") as err:
        load_dynahate(empty_text, "dev")
    assert (err.value.line, err.value.field) == (2, "text")

    no_id = write_csv(tmp_path / "c.csv", [[0, "x", "hate"]], header=["Unnamed: 0", "text", "label"])
    with pytest.raises(LmcycleError, match="missing field") as err:
        load_dynahate(no_id, "dev")
    assert err.value.field == "acl.id"

    duplicate = write_csv(tmp_path / "d.csv", [row(0, "hate", text="one"), row(1, "hate", text="two", acl_id="acl0")])
    with pytest.raises(LmcycleError, match="duplicate id 'acl0' \\(first on line 2\\)") as err:
        load_dynahate(duplicate, "dev")
    assert err.value.line == 3

    with pytest.raises(LmcycleError, match="unknown DynaHate split 'train'"):
        load_dynahate(tmp_path, "train")
    with pytest.raises(LmcycleError, match="db_test.csv"):
        load_dynahate(tmp_path, "test")


@pytest.mark.shared_data
def test_real_files_have_the_documented_counts():
    if not (SHARED_DYNAHATE / "db_test.csv").is_file():
        pytest.skip(reason=f"DynaHate data not found at {SHARED_DYNAHATE.resolve()} (../shared/data/dynahate)")
    test, dev = load_dynahate(SHARED_DYNAHATE, "test"), load_dynahate(SHARED_DYNAHATE, "dev")
    assert Counter(ex.target for ex in test) == {"hate": 2011, "nothate": 1560}
    assert Counter(ex.target for ex in dev) == {"hate": 1858, "nothate": 1648}
    ids = [ex.id for ex in test + dev]
    assert len(set(ids)) == len(ids) and all(i.startswith("acl") for i in ids)
