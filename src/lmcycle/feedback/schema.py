"""The label database's schema, as ordered migrations: ``schema_version`` records each one applied.

A database is at version *n* when migrations 1..n have run. :func:`migrate` applies the missing ones in order,
each in its own transaction together with its ``schema_version`` row, so a failure leaves the database at the
last version that completed (SQLite and Postgres both roll DDL back). Two processes that upgrade at once
queue: SQLite's write lock (``BEGIN IMMEDIATE``), a transaction-scoped advisory lock on Postgres. A migration,
once released, never changes: a change is a new migration at the end of the list.

Tables (version 3):

- ``users(id, name UNIQUE, role admin|labeler, password_hash, created_at)``: argon2id hashes.
- ``projects(id, name UNIQUE, overlap, too_fast_s, rating_scale, created_at)``: ``overlap`` is the default N for
  items imported without one; ``rating_scale`` is JSON ``{"name", "min", "max"}`` or NULL (version 2).
- ``guidelines(project_id, version, text, created_at)``: Markdown, one row per version, never edited.
- ``items(id, project_id, prompt_id, prompt, overlap, gold, meta, created_at)``, UNIQUE ``(project_id,
  prompt_id)``; ``gold`` is the known ranking (JSON list of groups of completion ids) of a gold item, else NULL.
- ``completions(item_id, position, completion_id, text, model, decoding)``: the item's k >= 2 completions in
  file order; ``decoding`` is JSON.
- ``assignments(id, item_id, user_id, slot, shown_at, guideline_version)``: UNIQUE ``(item_id, user_id)``
  (never twice to one labeler) and UNIQUE ``(item_id, slot)`` with ``0 <= slot < overlap`` (never more than
  N labelers, even when several take the last slot at once: one insert wins, the others look again).
- ``labels(id, assignment_id, submission_id UNIQUE, ranking, special, reason, comment, guideline_version,
  shown_at, submitted_at, undone_at)``: exactly one of ``ranking`` (JSON groups, best first) and ``special``
  (``not_rankable`` | ``unsafe``); at most one label per assignment with ``undone_at`` NULL. Undo sets
  ``undone_at`` instead of deleting, so a late retry of an undone submission is still recognised.
- ``ratings(label_id, completion_id, value)`` (version 2): the project's scalar rating per completion.
- ``sessions(token_hash, user_id, csrf_token, created_at, expires_at)`` (version 3): the labeling app's logins;
  ``token_hash`` is the SHA-256 (hex) of the cookie's token, never the token itself, so a copy of the
  database logs nobody in.
"""

from __future__ import annotations

import time

from lmcycle.errors import LmcycleError
from lmcycle.feedback.db import Database, Tx

# Postgres advisory-lock key of schema upgrades; any constant that nothing else on the server uses.
MIGRATION_LOCK = 0x6C6D6379

# (version, what it does, statements). Only ever append.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "users, projects, guidelines, items, completions, assignments, labels", [
        "CREATE TABLE users (id {pk}, name TEXT NOT NULL UNIQUE,"
        " role TEXT NOT NULL CHECK (role IN ('admin', 'labeler')), password_hash TEXT NOT NULL,"
        " created_at DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE projects (id {pk}, name TEXT NOT NULL UNIQUE, overlap INTEGER NOT NULL CHECK (overlap >= 1),"
        " too_fast_s DOUBLE PRECISION NOT NULL, created_at DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE guidelines (project_id INTEGER NOT NULL REFERENCES projects (id),"
        " version INTEGER NOT NULL CHECK (version >= 1), text TEXT NOT NULL,"
        " created_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (project_id, version))",
        "CREATE TABLE items (id {pk}, project_id INTEGER NOT NULL REFERENCES projects (id),"
        " prompt_id TEXT NOT NULL, prompt TEXT NOT NULL, overlap INTEGER NOT NULL CHECK (overlap >= 1),"
        " gold TEXT, meta TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, UNIQUE (project_id, prompt_id))",
        "CREATE TABLE completions (item_id INTEGER NOT NULL REFERENCES items (id), position INTEGER NOT NULL,"
        " completion_id TEXT NOT NULL, text TEXT NOT NULL, model TEXT NOT NULL, decoding TEXT NOT NULL,"
        " PRIMARY KEY (item_id, completion_id), UNIQUE (item_id, position))",
        "CREATE TABLE assignments (id {pk}, item_id INTEGER NOT NULL REFERENCES items (id),"
        " user_id INTEGER NOT NULL REFERENCES users (id), slot INTEGER NOT NULL CHECK (slot >= 0),"
        " shown_at DOUBLE PRECISION NOT NULL, guideline_version INTEGER NOT NULL,"
        " UNIQUE (item_id, user_id), UNIQUE (item_id, slot))",
        "CREATE INDEX assignments_user ON assignments (user_id)",
        "CREATE TABLE labels (id {pk}, assignment_id INTEGER NOT NULL REFERENCES assignments (id),"
        " submission_id TEXT NOT NULL UNIQUE, ranking TEXT,"
        " special TEXT CHECK (special IN ('not_rankable', 'unsafe')), reason TEXT NOT NULL,"
        " comment TEXT NOT NULL, guideline_version INTEGER NOT NULL, shown_at DOUBLE PRECISION NOT NULL,"
        " submitted_at DOUBLE PRECISION NOT NULL, undone_at DOUBLE PRECISION,"
        " CHECK ((ranking IS NULL) <> (special IS NULL)))",
        "CREATE UNIQUE INDEX labels_one_active ON labels (assignment_id) WHERE undone_at IS NULL",
    ]),
    (2, "rating scales: projects.rating_scale, ratings per completion", [
        "ALTER TABLE projects ADD COLUMN rating_scale TEXT",
        "CREATE TABLE ratings (label_id INTEGER NOT NULL REFERENCES labels (id), completion_id TEXT NOT NULL,"
        " value DOUBLE PRECISION NOT NULL, PRIMARY KEY (label_id, completion_id))",
    ]),
    (3, "login sessions of the labeling app", [
        "CREATE TABLE sessions (token_hash TEXT PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users (id),"
        " csrf_token TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX sessions_expiry ON sessions (expires_at)",
    ]),
]
CURRENT_VERSION = MIGRATIONS[-1][0]


def read_version(tx: Tx) -> int:
    """The schema version of the database (0: no label schema in it yet)."""
    if not tx.has_table("schema_version"):
        return 0
    return tx.value("SELECT MAX(version) AS v FROM schema_version") or 0


def migrate(db: Database, target: int = CURRENT_VERSION) -> tuple[int, int]:
    """Bring ``db`` up to version ``target``; returns ``(version before, version after)``.

    A database newer than this code (or than ``target``) is an error: lmcycle does not downgrade."""
    with db.transaction() as tx:
        before = read_version(tx)
    if before > target:
        raise LmcycleError(f"the label database is at schema version {before}, newer than this lmcycle "
                           f"knows ({target}): upgrade lmcycle", file=db.where)
    for version, _, statements in MIGRATIONS:
        if version > target:
            break
        with db.transaction() as tx:
            if db.dialect == "postgres":
                tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            # read again under the lock: another process may have applied it meanwhile
            if read_version(tx) >= version:
                continue
            if version == 1:
                tx.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                           " applied_at DOUBLE PRECISION NOT NULL)")
            for statement in statements:
                tx.execute(db.ddl(statement))
            tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, time.time()))
    with db.transaction() as tx:
        return before, read_version(tx)


def check_current(db: Database) -> None:
    """Refuse a database that is not at :data:`CURRENT_VERSION`, saying what to run."""
    with db.transaction() as tx:
        version = read_version(tx)
    if version == CURRENT_VERSION:
        return
    if version == 0:
        raise LmcycleError("not a label database (no schema_version table): create it with "
                           "`lmcycle label init --db ...`", file=db.where)
    if version < CURRENT_VERSION:
        raise LmcycleError(f"the label database is at schema version {version}, older than {CURRENT_VERSION}: "
                           "upgrade it with `lmcycle label init --db ...`", file=db.where)
    raise LmcycleError(f"the label database is at schema version {version}, newer than this lmcycle knows "
                       f"({CURRENT_VERSION}): upgrade lmcycle", file=db.where)
