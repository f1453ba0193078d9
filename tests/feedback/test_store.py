"""The label store, each test against SQLite and against Postgres (the ``db_url`` fixture)."""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from lmcycle.data.loaders import DatasetConfig, load_examples
from lmcycle.data.preferences import load_rankings, pairs_from_examples
from lmcycle.errors import LmcycleError
from lmcycle.feedback import db as dbmod
from lmcycle.feedback.export import write_export
from lmcycle.feedback.labels import Label
from lmcycle.feedback.stats import project_stats
from lmcycle.feedback.store import Conflict, Forbidden, LabelStore, NotFound

TIE = [["c1"], ["c0", "c2"]]  # c1 best, c0 and c2 tied below it


def _import(store, tmp_path, write_rows, rows, project="default"):
    return store.import_file(write_rows(tmp_path / f"items-{uuid.uuid4().hex[:6]}.jsonl", rows), project)


def _count(store, table):
    with store.db.transaction() as tx:
        return tx.value(f"SELECT COUNT(*) AS n FROM {table}")


def _label_all(store, name, ranking=TIE):
    """Let ``name`` label every item they can get; returns the stored labels."""
    done = []
    while (task := store.next_item_for(name)) is not None:
        done.append(store.submit(name, task.item_id, Label(ranking=ranking), uuid.uuid4().hex))
    return done


# -- accounts ----------------------------------------------------------------------------------------------------


def test_passwords_are_hashed_and_checked(store, users):
    assert store.verify_password("ann", "ann-password").name == "ann"
    assert store.verify_password("ann", "bob-password") is None
    assert store.verify_password("nobody", "ann-password") is None
    assert store.verify_password("root", "root-password").role == "admin"
    with store.db.transaction() as tx:
        stored = tx.value("SELECT password_hash FROM users WHERE name = ?", ("ann",))
    assert stored.startswith("$argon2id$") and "ann-password" not in stored


@pytest.mark.parametrize(("name", "role", "password", "error", "field"), [
    ("ann", "labeler", "long-enough", Conflict, "name"),
    ("new", "boss", "long-enough", LmcycleError, "role"),
    ("new", "labeler", "short", LmcycleError, "password"),
    ("has space", "labeler", "long-enough", LmcycleError, "name"),
    ("", "labeler", "long-enough", LmcycleError, "name"),
])
def test_bad_accounts_are_refused(store, users, name, role, password, error, field):
    with pytest.raises(error) as err:
        store.add_user(name, role, password)
    assert err.value.field == field
    assert _count(store, "users") == 4


def test_a_login_rehashes_when_the_hasher_settings_change(db_url, hasher):
    from argon2 import PasswordHasher

    with LabelStore.init(db_url, hasher=hasher) as s:
        s.add_user("ann", "labeler", "ann-password")
    stronger = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    with LabelStore.open(db_url, hasher=stronger) as s:
        assert s.verify_password("ann", "ann-password") is not None
        with s.db.transaction() as tx:
            stored = tx.value("SELECT password_hash FROM users WHERE name = 'ann'")
        assert "m=16,t=2,p=1" in stored
        assert s.verify_password("ann", "ann-password") is not None


# -- assignment --------------------------------------------------------------------------------------------------


def test_each_item_reaches_overlap_labelers_never_one_twice(store, users, tmp_path, item_row, write_rows):
    _import(store, tmp_path, write_rows, [item_row("p1"), item_row("p2", overlap=1), item_row("p3", overlap=3)])
    got = {name: [lab.prompt_id for lab in _label_all(store, name)] for name in users}
    assert got == {"ann": ["p1", "p2", "p3"], "bob": ["p1", "p3"], "cy": ["p3"]}
    snap = store.snapshot()
    assert sorted((item_id, name) for item_id, name in snap.assignments) == sorted(set(snap.assignments))
    assert store.next_item_for("ann") is None


def test_the_open_item_comes_back_until_it_is_labelled(store, users, tmp_path, item_row, write_rows, clock):
    _import(store, tmp_path, write_rows, [item_row("p1"), item_row("p2")])
    first = store.next_item_for("ann")
    clock.advance(30)
    again = store.next_item_for("ann")
    assert again == first  # same item, same order of completions, same shown_at: a reload changes nothing
    assert sorted(c.id for c in first.completions) == ["c0", "c1", "c2"]
    store.submit("ann", first.item_id, Label(ranking=TIE), "s1")
    assert store.next_item_for("ann").prompt_id == "p2"


def test_completion_order_is_shuffled_per_labeler_but_stable(store, tmp_path, item_row, write_rows):
    _import(store, tmp_path, write_rows, [item_row(f"p{i}", k=6, overlap=2) for i in range(4)])
    for name in ("ann", "bob"):
        store.add_user(name, "labeler", f"{name}-password")
    orders = {name: [] for name in ("ann", "bob")}
    for name in orders:
        while (task := store.next_item_for(name)) is not None:
            assert task.completions == store.next_item_for(name).completions
            orders[name].append([c.id for c in task.completions])
            store.submit(name, task.item_id, Label(special="not_rankable", reason="test"), uuid.uuid4().hex)
    # six completions: the chance that 8 independent shuffles all keep file order is (1/720)^8
    assert any(order != sorted(order) for order in orders["ann"] + orders["bob"])
    assert orders["ann"] != orders["bob"]


# -- submissions -------------------------------------------------------------------------------------------------


def test_submit_is_idempotent_by_submission_id(store, users, tmp_path, item_row, write_rows):
    _import(store, tmp_path, write_rows, [item_row("p1"), item_row("p2")])
    task = store.next_item_for("ann")
    first = store.submit("ann", task.item_id, Label(ranking=TIE, comment="first"), "click-1")
    # a double click or a retry: the same id, even with a different body, stores nothing new
    again = store.submit("ann", task.item_id, Label(ranking=[["c0", "c1", "c2"]]), "click-1")
    assert again == first and again.ranking == TIE and again.comment == "first"
    assert _count(store, "labels") == 1
    with pytest.raises(Conflict, match="already labelled") as err:
        store.submit("ann", task.item_id, Label(ranking=[["c0", "c1", "c2"]]), "click-2")
    assert err.value.field == "item_id"
    other = store.next_item_for("ann")
    with pytest.raises(Conflict, match="submission id was already used"):
        store.submit("ann", other.item_id, Label(ranking=TIE), "click-1")
    bob_task = store.next_item_for("bob")
    with pytest.raises(Conflict, match="submission id was already used"):
        store.submit("bob", bob_task.item_id, Label(ranking=TIE), "click-1")
    assert _count(store, "labels") == 1


def test_bad_submissions_store_nothing(store, users, tmp_path, item_row, write_rows):
    _import(store, tmp_path, write_rows, [item_row("p1"), item_row("p2")])
    task = store.next_item_for("ann")
    not_assigned = next(i.id for i in store.snapshot().items if i.id != task.item_id)
    cases = [
        (Label(ranking=[["c1"], ["c0"]]), task.item_id, "ann", LmcycleError, "ranking", "skips completion(s) c2"),
        (Label(ranking=[["c1"], ["c0", "c2", "c7"]]), task.item_id, "ann", LmcycleError, "ranking", "'c7'"),
        (Label(special="unsafe"), task.item_id, "ann", LmcycleError, "reason", "needs a reason"),
        (Label(ranking=TIE, ratings={"c0": 3.0}), task.item_id, "ann", LmcycleError, "ratings.c0", "outside"),
        (Label(ranking=TIE), 987654, "ann", NotFound, "item_id", "unknown item id"),
        (Label(ranking=TIE), not_assigned, "ann", Forbidden, "item_id", "not assigned to 'ann'"),
        (Label(ranking=TIE), task.item_id, "bob", Forbidden, "item_id", "not assigned to 'bob'"),
        (Label(ranking=TIE), task.item_id, "mallory", NotFound, "labeler", "no user"),
    ]
    for label, item_id, who, error, field, message in cases:
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            store.submit(who, item_id, label, uuid.uuid4().hex)
        assert err.value.field == field
    assert _count(store, "labels") == 0 and _count(store, "ratings") == 0
    assert store.labels_of("ann") == []


def test_a_failing_submission_is_rolled_back_whole(store, users, tmp_path, item_row, write_rows, monkeypatch):
    """The label row is written before the ratings: an error on a rating must take the label back with it."""
    _import(store, tmp_path, write_rows, [item_row("p1")])
    task = store.next_item_for("ann")
    execute = dbmod.Tx.execute

    def failing(self, sql, params=()):
        if sql.startswith("INSERT INTO ratings"):
            raise RuntimeError("disk full")
        return execute(self, sql, params)

    monkeypatch.setattr(dbmod.Tx, "execute", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        store.submit("ann", task.item_id, Label(ranking=TIE, ratings={"c0": 0.2}), "s1")
    monkeypatch.setattr(dbmod.Tx, "execute", execute)
    assert _count(store, "labels") == 0
    stored = store.submit("ann", task.item_id, Label(ranking=TIE, ratings={"c0": 0.2}), "s1")
    assert stored.ratings == {"c0": 0.2}


def test_undo_reopens_the_item_and_remembers_the_submission(store, users, tmp_path, item_row, write_rows, clock):
    _import(store, tmp_path, write_rows, [item_row("p1"), item_row("p2")])
    t1 = store.next_item_for("ann")
    store.submit("ann", t1.item_id, Label(ranking=TIE), "s1")
    t2 = store.next_item_for("ann")
    clock.advance(5)
    store.submit("ann", t2.item_id, Label(special="unsafe", reason="insults"), "s2")
    clock.advance(60)
    store.set_guidelines("# v2: rank by harmlessness first")
    undone = store.undo_last("ann")
    assert (undone.submission_id, undone.undone_at) == ("s2", clock.now)
    assert [lab.submission_id for lab in store.labels_of("ann")] == ["s1"]
    again = store.next_item_for("ann")
    assert again.item_id == t2.item_id
    assert (again.shown_at, again.guideline_version) == (clock.now, 2)  # shown anew, under today's guidelines
    # a late retry of the undone submission stores nothing and says it was undone
    assert store.submit("ann", t2.item_id, Label(ranking=TIE), "s2").undone_at == clock.now
    clock.advance(10)
    relabel = store.submit("ann", t2.item_id, Label(ranking=TIE), "s3")
    assert (relabel.guideline_version, relabel.seconds) == (2, 10)
    assert [lab.submission_id for lab in store.labels_of("ann")] == ["s1", "s3"]
    assert store.undo_last("bob") is None
    assert store.undo_last("ann").submission_id == "s3"
    assert store.undo_last("ann").submission_id == "s1"
    assert store.undo_last("ann") is None


def test_a_labeler_reads_only_their_own_labels(store, users, tmp_path, item_row, write_rows):
    _import(store, tmp_path, write_rows, [item_row("p1")])
    ann = _label_all(store, "ann")[0]
    bob = _label_all(store, "bob")[0]
    assert [lab.id for lab in store.labels_of("ann")] == [ann.id]
    assert [lab.id for lab in store.labels_of("bob")] == [bob.id]
    assert store.label("ann", ann.id) == ann
    with pytest.raises(Forbidden):
        store.label("bob", ann.id)
    assert store.label("root", ann.id) == ann  # an admin reads any
    with pytest.raises(NotFound):
        store.label("ann", 424242)


def test_labels_keep_the_guidelines_version_they_were_given_under(store, users, tmp_path, item_row, write_rows):
    _import(store, tmp_path, write_rows, [item_row("p1"), item_row("p2")])
    t1 = store.next_item_for("ann")
    assert store.set_guidelines("# v2") == 2
    first = store.submit("ann", t1.item_id, Label(ranking=TIE), "s1")  # shown under v1, submitted under v2
    t2 = store.next_item_for("ann")
    second = store.submit("ann", t2.item_id, Label(ranking=TIE), "s2")
    assert (first.guideline_version, second.guideline_version) == (1, 2)
    assert store.guidelines().text == "# v2"
    assert store.guidelines(version=1).text == "# Rank by helpfulness"
    with pytest.raises(NotFound):
        store.guidelines(version=3)


# -- import ------------------------------------------------------------------------------------------------------


def test_a_failed_import_stores_nothing(store, tmp_path, item_row, write_rows):
    bad = item_row("p3")
    bad["completions"][1]["id"] = "c0"
    path = write_rows(tmp_path / "items.jsonl", [item_row("p1"), item_row("p2"), bad])
    with pytest.raises(LmcycleError, match="duplicate completion id") as err:
        store.import_file(path)
    assert (err.value.line, err.value.field) == (3, "completions.1.id")
    assert _count(store, "items") == 0 and _count(store, "completions") == 0


def test_importing_a_prompt_id_again_stores_nothing_of_the_file(store, tmp_path, item_row, write_rows):
    assert _import(store, tmp_path, write_rows, [item_row("p1"), item_row("p2")]) == 2
    path = write_rows(tmp_path / "more.jsonl", [item_row("p3"), item_row("p2")])
    with pytest.raises(Conflict, match="'p2' is already in project") as err:
        store.import_file(path)
    assert (err.value.file, err.value.line) == (str(path), 2)
    assert [i.prompt_id for i in store.snapshot().items] == ["p1", "p2"]
    assert _count(store, "completions") == 6


def test_an_unknown_project_is_named(store, tmp_path, item_row, write_rows, users):
    with pytest.raises(NotFound, match="no project 'other'"):
        _import(store, tmp_path, write_rows, [item_row("p1")], project="other")
    with pytest.raises(NotFound, match="no project"):
        store.next_item_for("ann", "other")
    with pytest.raises(Conflict):
        store.create_project("default")


# -- export and stats --------------------------------------------------------------------------------------------


def test_the_rankings_export_is_what_lmcycle_trains_on(store, users, tmp_path, item_row, write_rows):
    _import(store, tmp_path, write_rows, [item_row("p1"), item_row("p2"), item_row("p3", k=2)])
    t = store.next_item_for("ann")
    store.submit("ann", t.item_id, Label(ranking=TIE, ratings={"c0": 0.0, "c2": 0.75}), "a1")
    t = store.next_item_for("ann")
    store.submit("ann", t.item_id, Label(special="unsafe", reason="doxxing"), "a2")
    t = store.next_item_for("ann")
    store.submit("ann", t.item_id, Label(ranking=[["c1"], ["c0"]]), "a3")
    t = store.next_item_for("bob")
    store.submit("bob", t.item_id, Label(ranking=[["c2"], ["c1"], ["c0"]]), "b1")
    out = tmp_path / "export" / "rankings.jsonl"
    assert write_export(store.snapshot(), out, "rankings") == 4
    rankings = load_rankings(out)
    got = {(r.prompt_id, r.labeler): (r.ranks, r.special) for r in rankings}
    assert got == {("p1", "ann"): ([2, 1, 2], None), ("p2", "ann"): ([None] * 3, "unsafe"),
                   ("p3", "ann"): ([2, 1], None), ("p1", "bob"): ([3, 2, 1], None)}
    assert rankings[0].completions == [f"answer {j} to p1" for j in range(3)]
    # and through a recipe's `data: {format: rankings}`: 2 + 1 + 3 strict pairs, the unsafe label makes none
    examples = load_examples(DatasetConfig(format="rankings", path=str(out), split="all"))
    pairs = pairs_from_examples(examples)
    assert len(pairs) == 6
    assert {(p.labeler, p.chosen, p.rejected) for p in pairs if p.prompt_id == "p3"} == {
        ("ann", "answer 1 to p3", "answer 0 to p3")}
    rows = out.read_text(encoding="utf-8").splitlines()
    first = json.loads(rows[0])
    assert (first["ratings"], first["guideline_version"], first["models"]) == ([0.0, None, 0.75], 1, ["tiny-sft"] * 3)


def test_the_jsonl_export_keeps_the_stored_record(store, users, tmp_path, item_row, write_rows):
    _import(store, tmp_path, write_rows, [item_row("p1", gold=[["c0"], ["c1"], ["c2"]])])
    t = store.next_item_for("ann")
    store.submit("ann", t.item_id, Label(ranking=TIE, comment="close call"), "a1")
    store.undo_last("ann")
    store.submit("ann", t.item_id, Label(ranking=[["c0"], ["c1", "c2"]]), "a2")
    out = tmp_path / "labels.jsonl"
    assert write_export(store.snapshot(), out, "jsonl") == 1  # the undone label is not exported
    row = json.loads(out.read_text(encoding="utf-8"))
    assert (row["submission_id"], row["ranking"], row["labeler"]) == ("a2", [["c0"], ["c1", "c2"]], "ann")
    assert row["item"]["gold"] == [["c0"], ["c1"], ["c2"]]
    assert row["item"]["completions"][1]["decoding"] == {"do_sample": True, "top_p": 0.9, "seed": 1}


def test_an_export_with_nothing_to_export_writes_nothing(store, tmp_path):
    out = tmp_path / "labels.jsonl"
    with pytest.raises(LmcycleError, match="no labels to export"):
        write_export(store.snapshot(), out)
    assert not out.exists()


def test_stats_count_progress_gold_accuracy_and_haste(store, users, tmp_path, item_row, write_rows, clock):
    gold = [["c0"], ["c1"], ["c2"]]
    _import(store, tmp_path, write_rows, [item_row("g1", gold=gold), item_row("p1"), item_row("p2")])
    for ranking, wait in ((gold, 10), (TIE, 1), (TIE, 20)):  # ann: gold exactly right; one in 1 s
        t = store.next_item_for("ann")
        clock.advance(wait)
        store.submit("ann", t.item_id, Label(ranking=ranking), uuid.uuid4().hex)
    t = store.next_item_for("bob")  # bob: gold reversed, fast
    clock.advance(2)
    store.submit("bob", t.item_id, Label(ranking=[["c2"], ["c1"], ["c0"]]), "b1")
    stats = project_stats(store.snapshot())
    assert stats["too_fast_s"] == 3.0
    assert stats["overall"] == {"items": 3, "gold_items": 1, "items_complete": 1, "labels_needed": 6, "done": 4,
                                "left": 2, "too_fast": 2}
    by = {r["labeler"]: r for r in stats["labelers"]}
    assert (by["ann"]["done"], by["ann"]["left"], by["ann"]["gold_accuracy"], by["ann"]["too_fast"]) == (3, 0, 1.0, 1)
    assert (by["bob"]["done"], by["bob"]["left"], by["bob"]["gold_accuracy"], by["bob"]["too_fast"]) == (1, 2, 0.0, 1)
    assert (by["cy"]["done"], by["cy"]["left"], by["cy"]["gold_accuracy"]) == (0, 2, None)
    assert by["ann"]["median_seconds"] == 10
    assert project_stats(store.snapshot(), too_fast_s=15)["overall"]["too_fast"] == 3


# -- concurrency -------------------------------------------------------------------------------------------------


def _crowd(db_url, hasher, path, item_row, write_rows, *, labelers: int, items: int, overlap: int):
    """A store with ``items`` items of that overlap and ``labelers`` accounts; returns (store, names)."""
    store = LabelStore.init(db_url, hasher=hasher)
    store.create_project(overlap=overlap)
    store.import_file(write_rows(path, [item_row(f"p{i}") for i in range(items)]))
    names = [f"labeler{i}" for i in range(labelers)]
    for name in names:
        store.add_user(name, "labeler", "password-" + name)
    return store, names


def _all_at_once(names, work) -> None:
    """Run ``work(name)`` in one thread per name, all released together; re-raise the first failure."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(names))

    def run(name: str) -> None:
        try:
            start.wait()
            work(name)
        except BaseException as e:  # a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a labeler thread hangs"
    if errors:
        raise errors[0]


def test_twenty_labelers_at_once_lose_and_duplicate_nothing(db_url, tmp_path, item_row, write_rows, hasher):
    """20 threads, each its own labeler, label 50 items each (overlap 20), every submission sent twice as a
    retry would: 1000 labels stored, each the one its submitter was told, nobody twice on an item."""
    n_labelers, n_items = 20, 50
    store, names = _crowd(db_url, hasher, tmp_path / "items.jsonl", item_row, write_rows, labelers=n_labelers,
                          items=n_items, overlap=n_labelers)
    returned: dict[str, list[int]] = {name: [] for name in names}

    def work(name: str) -> None:
        while (task := store.next_item_for(name)) is not None:
            sid = uuid.uuid4().hex
            first = store.submit(name, task.item_id, Label(ranking=TIE), sid)
            assert store.submit(name, task.item_id, Label(ranking=TIE), sid).id == first.id
            returned[name].append(first.id)

    try:
        _all_at_once(names, work)
        snap = store.snapshot()
        assert len(snap.labels) == n_labelers * n_items == _count(store, "labels")
        assert sorted(lab.id for lab in snap.labels) == sorted(i for ids in returned.values() for i in ids)
        assert len({(lab.item_id, lab.labeler) for lab in snap.labels}) == len(snap.labels)
        assert all(len(ids) == n_items for ids in returned.values())
    finally:
        store.close()


def test_the_last_slots_go_to_exactly_overlap_labelers_under_contention(db_url, tmp_path, item_row, write_rows,
                                                                        hasher):
    """20 labelers race for 10 items of overlap 3: every item ends with exactly 3 labels, never 4."""
    n_items, overlap = 10, 3
    store, names = _crowd(db_url, hasher, tmp_path / "items.jsonl", item_row, write_rows, labelers=20,
                          items=n_items, overlap=overlap)
    try:
        _all_at_once(names, lambda name: _label_all(store, name))
        snap = store.snapshot()
        per_item: dict[int, list[str]] = {}
        for lab in snap.labels:
            per_item.setdefault(lab.item_id, []).append(lab.labeler)
        assert sorted(len(v) for v in per_item.values()) == [overlap] * n_items
        assert all(len(set(v)) == overlap for v in per_item.values())
        assert len(snap.assignments) == n_items * overlap  # no slot handed out beyond the overlap
    finally:
        store.close()


def test_a_burst_of_the_same_submission_stores_it_once(db_url, tmp_path, item_row, write_rows, hasher):
    """Eight copies of one submission arriving at once (a retrying client, several server workers): one label,
    and every copy is answered with it; a different submission racing them is refused."""
    store, _ = _crowd(db_url, hasher, tmp_path / "items.jsonl", item_row, write_rows, labelers=1, items=1,
                      overlap=1)
    task = store.next_item_for("labeler0")
    answers: dict[str, str] = {}

    def work(copy: str) -> None:
        sid = "other" if copy == "copy7" else "same"
        try:
            answers[copy] = store.submit("labeler0", task.item_id, Label(ranking=TIE), sid).submission_id
        except Conflict:
            answers[copy] = "refused"

    try:
        _all_at_once([f"copy{i}" for i in range(8)], work)
        assert _count(store, "labels") == 1
        stored = store.labels_of("labeler0")[0].submission_id
        # whichever came first is stored; the copies of the other one are refused
        same, other = ("same", "refused") if stored == "same" else ("refused", "other")
        assert answers == {f"copy{i}": same for i in range(7)} | {"copy7": other}
    finally:
        store.close()
