"""The labeling app under concurrent load, as a correctness test: ``benchmarks/label_load.py`` reduced to 20
labelers x 10 submissions, against ``lmcycle label serve`` in a process of its own, on SQLite and Postgres.
Nothing here is timed: what is asserted is that no label is lost or stored twice and that every replayed
submission is answered 200 and stores nothing. Also the benchmark's own arithmetic (items needed, replay plan,
percentiles) and that its database check does catch a lost, a phantom and a duplicated label.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from lmcycle.feedback.labels import Label
from lmcycle.feedback.store import LabelStore

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "label_load.py"
_spec = importlib.util.spec_from_file_location("label_load", _PATH)
label_load = importlib.util.module_from_spec(_spec)
sys.modules["label_load"] = label_load  # dataclasses look their module up by name
_spec.loader.exec_module(label_load)


def test_twenty_concurrent_labelers_lose_nothing_and_store_nothing_twice(db_url, hasher):
    # accounts hashed cheaply (the server rehashes them at its default cost on login: real logins)
    r = label_load.run_load(db_url, labelers=20, submissions=10, overlap=3, hasher=hasher)
    c = r["check"]
    assert r["errors"] == 0, r["error_messages"]
    assert c["live_labels"] == c["label_rows"] == c["expected"] == 200
    assert c["lost"] == 0 and c["duplicated"] == 0 and c["unacknowledged"] == 0 and c["undone"] == 0
    assert c["assignments"] == 200  # nobody was handed an item they did not label
    assert c["replays"] == 20 and c["replays_ok"] == 20  # 10 retries after the reply, 10 simultaneous twins
    assert c["ok"]
    assert r["items"] == 73  # the default: no labeler can run out (67 = ceil(200 / 3) could)
    assert r["next"]["n"] == 200 and r["post"]["n"] == 220  # one GET per label; one extra POST per replay
    assert 0 < r["post"]["p50_ms"] <= r["post"]["p95_ms"] <= r["post"]["p99_ms"]


def test_items_needed_is_the_bound_of_the_argument():
    assert label_load.items_needed(20, 50, 3) == 366  # 3 I > 1000 + 100 - 3
    assert label_load.items_needed(20, 50, 1) == 1000  # overlap 1: one item per label
    assert label_load.items_needed(1, 5, 3) == 5  # alone, one item per label whatever the overlap
    assert label_load.items_needed(20, 10, 3) == 73  # 3 I > 200 + 20 - 3 = 217


def test_replay_plan_sends_a_tenth_twice_alternating_retries_and_twins():
    names = [f"l{i}" for i in range(20)]
    plan = label_load.replay_plan(names, 50, 0.1, seed=0)
    assert all(len(plan[n]) == 5 and all(0 <= i < 50 for i in plan[n]) for n in names)
    kinds = [k for n in names for _, k in sorted(plan[n].items())]
    assert kinds == ["retry", "twin"] * 50
    assert plan == label_load.replay_plan(names, 50, 0.1, seed=0)
    assert plan != label_load.replay_plan(names, 50, 0.1, seed=1)
    one_each = label_load.replay_plan(names, 10, 0.1, seed=0)
    assert [k for n in names for k in one_each[n].values()] == ["retry", "twin"] * 10


def test_percentiles_interpolate_between_order_statistics():
    # 1..5 s: p50 is the middle value; p95 sits at rank 0.95 * 4 = 3.8, 80% of the way from 4 s to 5 s
    p = label_load.percentiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert p["p50_ms"] == pytest.approx(3000.0)
    assert p["p95_ms"] == pytest.approx(4800.0)
    assert p["p99_ms"] == pytest.approx(4960.0)


def test_split_password_moves_it_out_of_the_url():
    assert label_load.split_password("postgresql://u:p%40ss@h:5432/db?x=1") == ("postgresql://u@h:5432/db?x=1",
                                                                               "p@ss")
    assert label_load.split_password("postgresql://u@h/db") == ("postgresql://u@h/db", None)
    assert label_load.split_password("/tmp/labels.sqlite") == ("/tmp/labels.sqlite", None)


def test_database_check_catches_lost_phantom_and_duplicated_labels(tmp_path, hasher):
    url = str(tmp_path / "labels.sqlite")
    label_load.prepare(url, items=3, k=4, overlap=1, labelers=1, hasher=hasher)
    with LabelStore.open(url) as store:
        ids = {}
        for n in range(2):
            task = store.next_item_for("labeler00")
            ids[f"s{n}"] = store.submit("labeler00", task.item_id, Label(ranking=[["c0", "c1", "c2", "c3"]]),
                                        f"s{n}").id
    seen = label_load.LabelerResult("labeler00", acknowledged=dict(ids))
    good = label_load.check_database(url, [seen], expected=2)
    assert good["ok"] and good["lost"] == good["duplicated"] == good["unacknowledged"] == 0

    ghost = label_load.LabelerResult("labeler00", acknowledged={**ids, "s9": 999})  # a 201 never stored
    assert label_load.check_database(url, [ghost], 2)["lost"] == 1
    half = label_load.LabelerResult("labeler00", acknowledged={"s0": ids["s0"]})  # stored, never confirmed
    bad = label_load.check_database(url, [half], 2)
    assert bad["unacknowledged"] == 1 and not bad["ok"]

    with LabelStore.open(url) as store:  # a second label row for one assignment
        undone = store.undo_last("labeler00")
        again = store.submit("labeler00", undone.item_id, Label(ranking=[["c1"], ["c0", "c2", "c3"]]), "s2")
    relabelled = label_load.LabelerResult("labeler00", {**ids, "s2": again.id})
    twice = label_load.check_database(url, [relabelled], 2)
    assert twice["duplicated"] == 1 and twice["label_rows"] == 3 and twice["live_labels"] == 2
    assert not twice["ok"]

    wrong_replay = label_load.LabelerResult("labeler00", dict(ids), replays=[("retry", "s0", [201, 201],
                                                                              [ids["s0"], ids["s0"]])])
    report = label_load.check_database(url, [wrong_replay], 2)
    assert report["replays"] == 1 and report["replays_ok"] == 0 and not report["ok"]
