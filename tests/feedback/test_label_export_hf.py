"""``lmcycle label export --format hf`` (a ``datasets`` folder, written atomically) and ``lmcycle label import``
of a completions stage's folder."""

from __future__ import annotations

import sys

import pytest

from lmcycle.cli.main import main
from lmcycle.feedback.export import rankings_rows
from lmcycle.feedback.labels import Label
from lmcycle.feedback.store import LabelStore


def _run(capsys, *argv):
    code = main(["label", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def labelled(store, users, tmp_path, item_row, write_rows):
    """Two items, each labelled by ann (a ranking with a tie, ratings) and bob (unsafe on p1)."""
    store.import_file(write_rows(tmp_path / "items.jsonl", [item_row("p0"), item_row("p1")]))
    for labeler in ("ann", "bob"):
        while (task := store.next_item_for(labeler)) is not None:
            label = (Label(special="unsafe", reason="harm") if (labeler, task.prompt_id) == ("bob", "p1") else
                     Label(ranking=[["c1"], ["c0", "c2"]], ratings={"c0": 0.25}))
            store.submit(labeler, task.item_id, label, f"{labeler}-{task.item_id}")
    return store


def test_hf_export_reads_back_as_the_rankings_rows_and_replaces_only_a_dataset(labelled, db_url, tmp_path, capsys):
    import datasets

    out = tmp_path / "hf"
    code, printed, _ = _run(capsys, "export", "--db", db_url, "--out", str(out), "--format", "hf")
    assert code == 0 and printed.strip() == f"wrote 4 label(s) to {out} (hf)"
    want = rankings_rows(labelled.snapshot())
    assert datasets.load_from_disk(str(out)).to_list() == want
    assert want[3]["special"] == "unsafe" and want[3]["ranks"] is None and want[0]["ranks"] == [2, 1, 2]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")] == []  # no temporary folder left

    labelled.undo_last("ann")  # one label fewer: exporting again replaces the dataset whole
    assert _run(capsys, "export", "--db", db_url, "--out", str(out), "--format", "hf")[0] == 0
    assert datasets.load_from_disk(str(out)).to_list() == rankings_rows(labelled.snapshot()) != want
    assert len(want) == 4 and len(rankings_rows(labelled.snapshot())) == 3

    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("not a dataset")
    code, _, err = _run(capsys, "export", "--db", db_url, "--out", str(other), "--format", "hf")
    assert code == 1 and "exists and is not a saved dataset" in err
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_hf_export_without_datasets_says_what_to_install(labelled, db_url, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    code, _, err = _run(capsys, "export", "--db", db_url, "--out", str(tmp_path / "hf"), "--format", "hf")
    assert code == 1 and 'pip install "lmcycle[data]"' in err
    assert not (tmp_path / "hf").exists()


def test_import_takes_a_completions_stage_folder(tmp_path, capsys, item_row, write_rows):
    db = str(tmp_path / "labels.sqlite")
    assert _run(capsys, "init", "--db", db)[0] == 0
    stage = tmp_path / "run" / "completions"
    stage.mkdir(parents=True)
    write_rows(stage / "completions.jsonl", [item_row("p0"), item_row("p1")])
    code, out, _ = _run(capsys, "import", "--db", db, str(stage))
    assert (code, out.strip()) == (0, "imported 2 item(s) into project 'default'")
    with LabelStore.open(db) as store:
        assert [i.prompt_id for i in store.snapshot().items] == ["p0", "p1"]
    code, _, err = _run(capsys, "import", "--db", db, str(tmp_path / "run"))
    assert code == 1 and err.strip() == (f"lmcycle: error: {tmp_path / 'run'}: a folder without completions.jsonl: "
                                         "give a completions file or a completions stage's folder (RUN_DIR/STAGE)")
