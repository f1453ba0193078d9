"""``lmcycle label``: an admin's session from init to export, and its errors as one line."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from lmcycle.cli.main import main
from lmcycle.data.preferences import load_rankings
from lmcycle.feedback.labels import Label
from lmcycle.feedback.schema import CURRENT_VERSION
from lmcycle.feedback.store import LabelStore


def _run(capsys, *argv):
    code = main(["label", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_an_admin_session_from_init_to_export(db_url, tmp_path, capsys, item_row, write_rows):
    guide = tmp_path / "guide.md"
    guide.write_text("# Rank the summaries\n\nBest first; ties allowed.\n", encoding="utf-8")
    code, out, _ = _run(capsys, "init", "--db", db_url, "--overlap", "2", "--rating", "toxicity:0:1",
                        "--guidelines", str(guide))
    assert code == 0 and f"schema version {CURRENT_VERSION} (created)" in out and "rating toxicity 0-1" in out
    code, out, _ = _run(capsys, "init", "--db", db_url)
    assert code == 0 and "(created)" not in out and "exists; its settings are kept" in out
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery\nignored second line\n")
    assert _run(capsys, "add-user", "ann", "--role", "labeler", "--db", db_url, "--password-file", str(pw))[0] == 0
    items = write_rows(tmp_path / "items.jsonl", [item_row("p1", gold=[["c0"], ["c1"], ["c2"]]), item_row("p2")])
    code, out, _ = _run(capsys, "import", "--db", db_url, str(items))
    assert (code, out.strip()) == (0, "imported 2 item(s) into project 'default'")
    code, out, _ = _run(capsys, "guidelines", "--db", db_url, str(guide))
    assert out.strip() == "project 'default': guidelines version 2"

    with LabelStore.open(db_url) as store:
        assert store.verify_password("ann", "correct horse battery") is not None
        assert store.project().rating_scale.name == "toxicity"
        assert store.guidelines(version=1).text.startswith("# Rank the summaries")
        while (task := store.next_item_for("ann")) is not None:
            store.submit("ann", task.item_id, Label(ranking=[["c0"], ["c1", "c2"]]), f"s-{task.item_id}")

    code, out, _ = _run(capsys, "stats", "--db", db_url, "--json")
    stats = json.loads(out)
    assert stats["overall"]["done"] == 2 and stats["overall"]["left"] == 2
    (ann,) = stats["labelers"]
    assert (ann["labeler"], ann["done"], ann["gold_accuracy"]) == ("ann", 2, 2 / 3)
    code, out, _ = _run(capsys, "stats", "--db", db_url)
    assert code == 0 and "labels 2 done, 2 left of 4" in out and "0.67" in out

    out_file = tmp_path / "out" / "rankings.jsonl"
    code, out, _ = _run(capsys, "export", "--db", db_url, "--out", str(out_file))
    assert code == 0 and "wrote 2 label(s)" in out
    assert [r.ranks for r in load_rankings(out_file)] == [[1, 2, 2], [1, 2, 2]]
    code, _, _ = _run(capsys, "export", "--db", db_url, "--out", str(tmp_path / "raw.jsonl"), "--format", "jsonl")
    assert json.loads((tmp_path / "raw.jsonl").read_text().splitlines()[0])["ranking"] == [["c0"], ["c1", "c2"]]


def test_errors_are_one_line_and_exit_1(tmp_path, capsys, item_row, write_rows):
    db = str(tmp_path / "labels.sqlite")
    code, _, err = _run(capsys, "stats", "--db", db)
    assert code == 1 and err.strip() == f"lmcycle: error: {db}: no label database here: create it with " \
                                        "`lmcycle label init --db ...`"
    assert _run(capsys, "init", "--db", db)[0] == 0
    bad = item_row("p2", k=1)
    items = write_rows(tmp_path / "items.jsonl", [item_row("p1"), bad])
    code, _, err = _run(capsys, "import", "--db", db, str(items))
    assert code == 1
    assert err.strip() == (f"lmcycle: error: {items}:2: field 'completions': 1 completion(s): an item needs at "
                           "least 2 to rank")
    code, _, err = _run(capsys, "init", "--db", str(tmp_path / "other.sqlite"), "--rating", "toxicity:high")
    assert code == 1 and "--rating takes NAME:MIN:MAX" in err
    code, _, err = _run(capsys, "export", "--db", db, "--out", str(tmp_path / "x.jsonl"))
    assert code == 1 and "no labels to export yet" in err
    assert not (tmp_path / "x.jsonl").exists()


def test_the_password_is_never_an_argument(tmp_path, capsys, monkeypatch):
    db = str(tmp_path / "labels.sqlite")
    _run(capsys, "init", "--db", db)
    with pytest.raises(SystemExit) as exit_:  # not even as an abbreviation of --password-file
        main(["label", "add-user", "ann", "--role", "labeler", "--db", db, "--password", "hunter22"])
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    # no terminal and no file: an error that says what to do, not a hang on input
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = _run(capsys, "add-user", "ann", "--role", "labeler", "--db", db)
    assert code == 1 and "--password-file" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("from standard input\n"))
    assert _run(capsys, "add-user", "ann", "--role", "admin", "--db", db, "--password-file", "-")[0] == 0
    code, _, err = _run(capsys, "add-user", "bob", "--role", "labeler", "--db", db, "--password-file",
                        str(tmp_path / "missing"))
    assert code == 1 and "file not found" in err
    with LabelStore.open(db) as store:
        assert store.verify_password("ann", "from standard input").role == "admin"
        assert [u.name for u in store.snapshot().users] == ["ann"]


def test_label_commands_load_neither_torch_nor_transformers(tmp_path):
    db = tmp_path / "labels.sqlite"
    probe = (f"import sys\nfrom lmcycle.cli import main\nassert main(['label', 'init', '--db', {str(db)!r}]) == 0\n"
             f"assert main(['label', 'stats', '--db', {str(db)!r}]) == 0\n"
             "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
