"""Schema versions and migrations: an old database upgrades, a failed migration leaves the last good version,
and what is not a current label database is refused with what to run."""

from __future__ import annotations

import threading

import pytest

from lmcycle.errors import LmcycleError
from lmcycle.feedback import schema
from lmcycle.feedback.db import Database, redact
from lmcycle.feedback.labels import Label, RatingScale
from lmcycle.feedback.schema import CURRENT_VERSION, migrate, read_version
from lmcycle.feedback.store import LabelStore


def _version(db: Database) -> int:
    with db.transaction() as tx:
        return read_version(tx)


def _fill_version_1(db: Database, password_hash: str) -> None:
    """A project with one labelled item, written as version 1's code wrote it (no rating_scale, no ratings)."""
    with db.transaction() as tx:
        tx.execute("INSERT INTO users (name, role, password_hash, created_at) VALUES ('ann', 'labeler', ?, 1.0)",
                   (password_hash,))
        tx.execute("INSERT INTO projects (name, overlap, too_fast_s, created_at) VALUES ('default', 2, 3.0, 1.0)")
        tx.execute("INSERT INTO guidelines (project_id, version, text, created_at) VALUES (1, 1, '# old', 1.0)")
        tx.execute("INSERT INTO items (project_id, prompt_id, prompt, overlap, gold, meta, created_at)"
                   " VALUES (1, 'p1', 'question?', 2, NULL, '{}', 1.0)")
        for pos, cid in enumerate(("a", "b")):
            tx.execute("INSERT INTO completions (item_id, position, completion_id, text, model, decoding)"
                       " VALUES (1, ?, ?, ?, 'm', '{}')", (pos, cid, f"answer {cid}"))
        tx.execute("INSERT INTO assignments (item_id, user_id, slot, shown_at, guideline_version)"
                   " VALUES (1, 1, 0, 10.0, 1)")
        tx.execute("INSERT INTO labels (assignment_id, submission_id, ranking, special, reason, comment,"
                   " guideline_version, shown_at, submitted_at) VALUES (1, 's1', ?, NULL, '', 'old', 1, 10.0, 25.0)",
                   ('[["b"], ["a"]]',))


def test_a_version_1_database_upgrades_and_keeps_its_labels(db_url, hasher):
    db = Database(db_url, create=True)
    assert migrate(db, target=1) == (0, 1)
    _fill_version_1(db, hasher.hash("ann-password"))
    db.close()
    with pytest.raises(LmcycleError,
                       match=f"schema version 1, older than {CURRENT_VERSION}: upgrade it with `lmcycle label init"):
        LabelStore.open(db_url)
    with LabelStore.init(db_url, hasher=hasher) as store:
        assert _version(store.db) == CURRENT_VERSION
        (old,) = store.labels_of("ann")
        assert (old.ranking, old.comment, old.ratings, old.seconds) == ([["b"], ["a"]], "old", {}, 15.0)
        assert store.project().rating_scale is None
        assert store.verify_password("ann", "ann-password") is not None
        # what version 2 added works on the upgraded database
        store.create_project("rated", rating_scale=RatingScale("toxicity", 0, 1))
        store.add_items([], "rated")
    with LabelStore.open(db_url) as store:
        assert store.project("rated").rating_scale == RatingScale("toxicity", 0.0, 1.0)


def test_init_again_changes_nothing(db_url):
    db = Database(db_url, create=True)
    try:
        assert migrate(db) == (0, CURRENT_VERSION)
        assert migrate(db) == (CURRENT_VERSION, CURRENT_VERSION)
        with db.transaction() as tx:
            assert tx.value("SELECT COUNT(*) AS n FROM schema_version") == CURRENT_VERSION
    finally:
        db.close()


def test_a_failing_migration_is_rolled_back_whole(db_url, monkeypatch):
    broken = (CURRENT_VERSION + 1, "a table, then a syntax error",
              ["CREATE TABLE extra (x INTEGER)", "CREATE TABLE broken (("])
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, broken])
    db = Database(db_url, create=True)
    try:
        with pytest.raises(Exception, match="syntax error"):
            migrate(db, target=CURRENT_VERSION + 1)
        assert _version(db) == CURRENT_VERSION
        with db.transaction() as tx:
            assert not tx.has_table("extra")  # the first statement of the failed migration went with it
            assert tx.has_table("ratings")
    finally:
        db.close()


def test_several_processes_initialising_at_once_all_succeed(db_url):
    outcomes: list = []

    def init():
        try:
            db = Database(db_url, create=True)
            outcomes.append(migrate(db)[1])
            db.close()
        except BaseException as e:  # reported below
            outcomes.append(e)

    threads = [threading.Thread(target=init) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert outcomes == [CURRENT_VERSION] * 4


def test_what_is_not_a_current_label_database_is_refused(db_url, tmp_path):
    db = Database(db_url, create=True)
    with pytest.raises(LmcycleError, match="not a label database"):
        LabelStore.open(db_url)
    migrate(db)
    with db.transaction() as tx:
        tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
    db.close()
    with pytest.raises(LmcycleError, match="version 99, newer than this lmcycle knows"):
        LabelStore.open(db_url)
    with pytest.raises(LmcycleError, match="newer than this lmcycle knows"):
        LabelStore.init(db_url)


def test_sqlite_paths_that_are_no_database(tmp_path):
    with pytest.raises(LmcycleError, match="no label database here: create it") as err:
        LabelStore.open(str(tmp_path / "missing.sqlite"))
    assert err.value.file == str(tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()
    text = tmp_path / "notes.sqlite"
    text.write_text("these are my notes, not a database\n" * 50)
    with pytest.raises(LmcycleError, match="not a SQLite database"):
        LabelStore.open(str(text))


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path):
    with LabelStore.init(str(tmp_path / "l.sqlite")) as store:
        with store.db.transaction() as tx:
            assert tx.value("PRAGMA journal_mode") == "wal"
            assert tx.value("PRAGMA foreign_keys") == 1
            with pytest.raises(Exception, match="FOREIGN KEY"):
                tx.execute("INSERT INTO guidelines (project_id, version, text, created_at) VALUES (42, 1, '', 0)")


def test_a_postgres_url_that_does_not_answer_is_one_line_without_the_password():
    pytest.importorskip("psycopg")
    with pytest.raises(LmcycleError, match="cannot connect") as err:
        Database("postgresql://ann:s3cret@127.0.0.1:1/labels")
    assert "s3cret" not in str(err.value) and "\n" not in str(err.value)
    assert err.value.file == "postgresql://ann:***@127.0.0.1:1/labels"
    assert redact("postgres://u@h/db") == "postgres://u@h/db"


def test_labels_survive_reopening(tmp_path, hasher):
    """Committed means on disk: a second store on the same file, opened after the first is closed, sees it."""
    url = str(tmp_path / "l.sqlite")
    with LabelStore.init(url, hasher=hasher) as store:
        store.create_project(overlap=1)
        store.add_user("ann", "labeler", "ann-password")
        from lmcycle.feedback.items import Completion, ItemSpec

        store.add_items([ItemSpec("p1", "q", [Completion("a", "x", "m"), Completion("b", "y", "m")])])
        task = store.next_item_for("ann")
        store.submit("ann", task.item_id, Label(ranking=[["a", "b"]]), "s1")
    with LabelStore.open(url) as store:
        assert [lab.ranking for lab in store.labels_of("ann")] == [[["a", "b"]]]


def test_the_same_sql_means_the_same_on_both(db_url):
    """``?`` is the one placeholder style; a ``?`` or ``%`` inside a string literal is text on both backends."""
    db = Database(db_url, create=True)
    try:
        with db.transaction() as tx:
            assert tx.value("SELECT 'what?' || ? || '100%' || 'it''s ?' AS v", ("-",)) == "what?-100%it's ?"
    finally:
        db.close()
