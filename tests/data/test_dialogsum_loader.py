"""The DialogSum loader: a fake directory for the layout and errors, the real shared copy for the counts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmcycle.data.dialogsum import load_dialogsum
from lmcycle.errors import LmcycleError

SHARED_DIALOGSUM = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dialogsum"

DIALOGUE = "#Person1#: Where is the bank?\n#Person2#: Next to the school."


def train_row(i: int) -> dict:
    return {"fname": f"train_{i}", "dialogue": DIALOGUE, "summary": f"Summary {i}.", "topic": f"topic {i}"}


def three_ref_row(i: int) -> dict:
    return {"fname": f"test_{i}", "dialogue": DIALOGUE, **{f"summary{k}": f"Ref {k} of {i}." for k in (1, 2, 3)},
            **{f"topic{k}": f"t{k}" for k in (1, 2, 3)}}


def write(path: Path, rows: list[dict]) -> None:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.fixture
def fake_dir(tmp_path) -> Path:
    write(tmp_path / "dialogsum.train.jsonl.gz", [train_row(i) for i in range(4)])
    write(tmp_path / "dialogsum.dev.jsonl", [train_row(i) | {"fname": f"dev_{i}"} for i in range(2)])
    write(tmp_path / "dialogsum.test.jsonl", [three_ref_row(i) for i in range(3)])
    return tmp_path


def test_layout(fake_dir):
    train = load_dialogsum(fake_dir, "train")
    assert [e.id for e in train] == [f"train_{i}" for i in range(4)]
    assert train[2].targets == ["Summary 2."] and train[2].meta["topic"] == "topic 2"
    assert train[0].input == DIALOGUE and train[0].task == "dialogsum"
    assert [e.id for e in load_dialogsum(fake_dir, "validation")] == ["dev_0", "dev_1"]
    test = load_dialogsum(fake_dir, "test")
    assert test[1].targets == ["Ref 1 of 1.", "Ref 2 of 1.", "Ref 3 of 1."]
    assert test[1].meta["topics"] == ["t1", "t2", "t3"]


def test_plain_jsonl_train_is_accepted(tmp_path):
    write(tmp_path / "dialogsum.train.jsonl", [train_row(0)])
    assert load_dialogsum(tmp_path, "train")[0].id == "train_0"


def test_missing_split_names_directory(tmp_path):
    write(tmp_path / "dialogsum.train.jsonl", [train_row(0)])
    with pytest.raises(LmcycleError) as e:
        load_dialogsum(tmp_path, "test")
    assert e.value.file == str(tmp_path) and "dialogsum.test.jsonl" in str(e.value)
    with pytest.raises(LmcycleError) as e:
        load_dialogsum(tmp_path / "absent", "train")
    assert e.value.file == str(tmp_path / "absent")
    with pytest.raises(LmcycleError) as e:
        load_dialogsum(tmp_path, "holdout")
    assert "test" in e.value.message and e.value.field == "split"


def test_bad_record_names_file_line_field(tmp_path):
    rows = [three_ref_row(0), three_ref_row(1)]
    del rows[1]["summary2"]
    write(tmp_path / "dialogsum.test.jsonl", rows)
    # summary3 remains, so the record claims three references but lacks one
    with pytest.raises(LmcycleError) as e:
        load_dialogsum(tmp_path, "test")
    file = tmp_path / "dialogsum.test.jsonl"
    assert (e.value.file, e.value.line, e.value.field) == (str(file), 2, "summary2")
    assert str(e.value).startswith(f"{file}:2: field 'summary2'")


@pytest.mark.shared_data
def test_real_dialogsum_counts():
    if not (SHARED_DIALOGSUM / "dialogsum.dev.jsonl").is_file():
        pytest.skip(reason=f"shared DialogSum data not found at {SHARED_DIALOGSUM.resolve()}")
    train = load_dialogsum(SHARED_DIALOGSUM, "train")
    dev = load_dialogsum(SHARED_DIALOGSUM, "dev")
    test = load_dialogsum(SHARED_DIALOGSUM, "test")
    assert (len(train), len(dev), len(test)) == (12460, 500, 500)
    assert {e.id for e in train} == {f"train_{i}" for i in range(12460)}
    assert all(len(e.targets) == 1 for e in train + dev)
    assert all(len(e.targets) == 3 and len(set(e.targets)) > 1 for e in test[:50])
    assert all(len(e.targets) == 3 for e in test)
    assert all(e.input.startswith("#Person1#:") for e in test)
    assert all(len(e.meta["topics"]) == 3 for e in test)
