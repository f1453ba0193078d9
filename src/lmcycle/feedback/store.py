"""The label store: accounts, projects with versioned guidelines, items, assignments and labels, in SQLite or
Postgres (:mod:`lmcycle.feedback.db`; the tables: :mod:`lmcycle.feedback.schema`).

What it guarantees, whichever the database:

- **Assignment.** :meth:`LabelStore.next_item_for` gives a labeler their open item if they have one, else the
  first item (in import order) that fewer than its ``overlap`` labelers have been given and they have not: an
  item reaches exactly N labelers and never one twice, also when many ask at once.
- **Submission.** :meth:`LabelStore.submit` is one transaction, checked before anything is written, and
  idempotent by ``submission_id``: the same id again (a double click, a retry after a lost reply) stores
  nothing and returns the label stored the first time; a second, different submission for an item the labeler
  has already labelled is refused (:class:`Conflict`: undo first). ``shown_at`` is when the store handed the
  item out and ``submitted_at`` when the label arrived, both on the store's clock: a client cannot claim it
  took its time.
- **Undo.** :meth:`LabelStore.undo_last` marks the labeler's newest label undone (kept, so a late retry of it
  is still recognised) and reopens its item for them, shown anew.
- **Ownership.** A labeler reads only their own labels (:meth:`LabelStore.labels_of`, :meth:`LabelStore.label`:
  :class:`Forbidden` for another's) and submits only for items assigned to them.

Errors are :class:`~lmcycle.errors.LmcycleError` subclasses, so a web layer can map them to status codes:
:class:`NotFound` (404), :class:`Forbidden` (403), :class:`Conflict` (409); the plain class is bad input (400).

Passwords are hashed with argon2id (``argon2-cffi``'s :class:`~argon2.PasswordHasher` and its defaults), and
rehashed on login when those defaults change. Login sessions (:meth:`LabelStore.open_session`) are rows keyed by
the SHA-256 of a random token, each with its CSRF token and expiry, so that any of a server's threads or
processes, or a restarted server, knows them.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcycle.errors import LmcycleError
from lmcycle.feedback.db import Database, Tx
from lmcycle.feedback.items import Completion, ItemSpec, read_completions
from lmcycle.feedback.labels import Label, RatingScale, check_label
from lmcycle.feedback.schema import check_current, migrate

ROLES = ("admin", "labeler")
DEFAULT_PROJECT = "default"
DEFAULT_OVERLAP = 3
DEFAULT_TOO_FAST_S = 3.0  # a k=4 ranking read and ordered in under 3 s was not read
MIN_PASSWORD = 8
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # safe in URLs, cookies and file names
MAX_SUBMISSION_ID = 200


class NotFound(LmcycleError):
    """No such user, project, item or label."""


class Forbidden(LmcycleError):
    """The thing exists but is not this user's: an item not assigned to them, another labeler's label."""


class Conflict(LmcycleError):
    """The request contradicts what is stored: a name taken, an item already labelled, an id reused."""


@dataclass(frozen=True)
class User:
    """An account (the password hash stays in the database)."""

    id: int
    name: str
    role: str


@dataclass(frozen=True)
class Project:
    """A labeling project's settings; ``guideline_version`` is its current guidelines' version."""

    id: int
    name: str
    overlap: int
    too_fast_s: float
    rating_scale: RatingScale | None
    guideline_version: int


@dataclass(frozen=True)
class Guidelines:
    """One version of a project's guidelines (Markdown)."""

    version: int
    text: str
    created_at: float


@dataclass(frozen=True)
class ShownCompletion:
    """A completion as a labeler sees it: no model name or settings, so that nobody ranks by brand."""

    id: str
    text: str


@dataclass(frozen=True)
class Task:
    """An item handed to a labeler: the prompt, its completions in an order of their own (a fixed shuffle per
    labeler and item, so that no position is always first), and the guidelines version it is given under."""

    item_id: int
    prompt_id: str
    prompt: str
    completions: list[ShownCompletion]
    guideline_version: int
    shown_at: float


@dataclass(frozen=True)
class Item:
    """An item as the admin sees it (for export and stats): completions in file order, with their models."""

    id: int
    prompt_id: str
    prompt: str
    completions: list[Completion]
    gold: list[list[str]] | None
    overlap: int
    meta: dict[str, Any]


@dataclass(frozen=True)
class StoredLabel:
    """A label as stored; ``undone_at`` is set once it was undone."""

    id: int
    submission_id: str
    item_id: int
    prompt_id: str
    labeler: str
    ranking: list[list[str]] | None
    special: str | None
    reason: str
    ratings: dict[str, float]
    comment: str
    guideline_version: int
    shown_at: float
    submitted_at: float
    undone_at: float | None

    @property
    def seconds(self) -> float:
        """How long the labeler had the item before submitting."""
        return self.submitted_at - self.shown_at


@dataclass(frozen=True)
class Snapshot:
    """One project read in one transaction: its items, who was given which, its live (not undone) labels and
    every account."""

    project: Project
    items: list[Item]
    assignments: list[tuple[int, str]]  # (item id, labeler)
    labels: list[StoredLabel]
    users: list[User]


@dataclass(frozen=True)
class Session:
    """A logged-in user of the labeling app: who, the token their state-changing requests must carry, and
    until when (seconds since the epoch) it holds."""

    user: User
    csrf_token: str
    expires_at: float


_LABEL_SELECT = ("SELECT l.*, a.item_id, i.prompt_id, u.name AS labeler FROM labels l"
                 " JOIN assignments a ON a.id = l.assignment_id JOIN items i ON i.id = a.item_id"
                 " JOIN users u ON u.id = a.user_id")
_RATING_SELECT = ("SELECT r.label_id, r.completion_id, r.value FROM ratings r JOIN labels l ON l.id = r.label_id"
                  " JOIN assignments a ON a.id = l.assignment_id JOIN items i ON i.id = a.item_id"
                  " JOIN users u ON u.id = a.user_id")


class LabelStore:
    """The label database's operations. ``clock`` gives the store's timestamps (seconds); ``hasher`` is an
    argon2 ``PasswordHasher`` (default: argon2-cffi's defaults). Safe to share between threads."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time, hasher: Any = None):
        self.db = db
        self.clock = clock
        self._hasher = hasher
        self._dummy_hash: str | None = None

    @classmethod
    def open(cls, url: str, **kwargs: Any) -> LabelStore:
        """Open an existing label database at the current schema version (else an error saying what to run)."""
        db = Database(url)
        try:
            check_current(db)
        except BaseException:
            db.close()
            raise
        return cls(db, **kwargs)

    @classmethod
    def init(cls, url: str, **kwargs: Any) -> LabelStore:
        """Create the label database, or upgrade an older one, and open it."""
        db = Database(url, create=True)
        try:
            migrate(db)
        except BaseException:
            db.close()
            raise
        return cls(db, **kwargs)

    def close(self) -> None:
        """Close the database connections of every thread."""
        self.db.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- accounts --------------------------------------------------------------------------------------------

    def _password_hasher(self) -> Any:
        if self._hasher is None:
            try:
                from argon2 import PasswordHasher  # lazy: the label extra
            except ImportError:
                raise LmcycleError("accounts need argon2-cffi: pip install 'lmcycle[label]'") from None
            self._hasher = PasswordHasher()
        return self._hasher

    def add_user(self, name: str, role: str, password: str) -> User:
        """Create an account; the name must be new, the role ``admin`` or ``labeler``, the password at least
        8 characters."""
        if not NAME_RE.fullmatch(name):
            raise LmcycleError(f"user name {name!r:.70} must be 1-64 letters, digits or _.@- (starting with a "
                               "letter or digit)", field="name")
        if role not in ROLES:
            raise LmcycleError(f"unknown role {role!r:.30} (known: {', '.join(ROLES)})", field="role")
        if len(password) < MIN_PASSWORD:
            raise LmcycleError(f"a password needs at least {MIN_PASSWORD} characters", field="password")
        hashed = self._password_hasher().hash(password)  # before the transaction: it takes ~0.1 s
        with self.db.transaction() as tx:
            user_id = tx.value("INSERT INTO users (name, role, password_hash, created_at) VALUES (?, ?, ?, ?)"
                               " ON CONFLICT DO NOTHING RETURNING id", (name, role, hashed, self.clock()))
        if user_id is None:
            raise Conflict(f"user '{name}' already exists", field="name")
        return User(user_id, name, role)

    def verify_password(self, name: str, password: str) -> User | None:
        """The user if ``password`` is theirs, else None (also for an unknown name, after the same work, so
        that timing does not tell which names exist)."""
        from argon2.exceptions import InvalidHashError, VerificationError  # lazy: the label extra

        hasher = self._password_hasher()
        with self.db.transaction() as tx:
            row = tx.one("SELECT id, name, role, password_hash FROM users WHERE name = ?", (name,))
        if row is None:
            if self._dummy_hash is None:
                self._dummy_hash = hasher.hash("not anybody's password")
            stored = self._dummy_hash
        else:
            stored = row["password_hash"]
        try:
            hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        if hasher.check_needs_rehash(stored):
            with self.db.transaction() as tx:
                tx.execute("UPDATE users SET password_hash = ? WHERE id = ?", (hasher.hash(password), row["id"]))
        return User(row["id"], row["name"], row["role"])

    def user(self, name: str) -> User:
        """The account called ``name`` (:class:`NotFound` if none)."""
        with self.db.transaction() as tx:
            return _user(tx, name)

    # -- projects and guidelines -----------------------------------------------------------------------------

    def create_project(self, name: str = DEFAULT_PROJECT, *, overlap: int = DEFAULT_OVERLAP,
                       too_fast_s: float = DEFAULT_TOO_FAST_S, rating_scale: RatingScale | None = None,
                       guidelines: str = "") -> Project:
        """A new project with guidelines version 1 (``guidelines``, Markdown; may be empty for now)."""
        if not NAME_RE.fullmatch(name):
            raise LmcycleError(f"project name {name!r:.70} must be 1-64 letters, digits or _.@-", field="project")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1:
            raise LmcycleError(f"overlap must be an integer >= 1, got {overlap!r:.20}", field="overlap")
        if not too_fast_s >= 0:
            raise LmcycleError(f"too_fast_s must be >= 0 seconds, got {too_fast_s}", field="too_fast_s")
        scale = None if rating_scale is None else json.dumps(
            {"name": rating_scale.name, "min": rating_scale.min, "max": rating_scale.max})
        now = self.clock()
        with self.db.transaction() as tx:
            project_id = tx.value("INSERT INTO projects (name, overlap, too_fast_s, rating_scale, created_at)"
                                  " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                                  (name, overlap, float(too_fast_s), scale, now))
            if project_id is None:
                raise Conflict(f"project '{name}' already exists", field="project")
            tx.execute("INSERT INTO guidelines (project_id, version, text, created_at) VALUES (?, 1, ?, ?)",
                       (project_id, guidelines, now))
            return _project(tx, name)

    def project(self, name: str = DEFAULT_PROJECT) -> Project:
        """The project called ``name`` (:class:`NotFound` if none)."""
        with self.db.transaction() as tx:
            return _project(tx, name)

    def set_guidelines(self, text: str, project: str = DEFAULT_PROJECT) -> int:
        """Make ``text`` the project's guidelines as a new version; returns that version. Items handed out
        from now on are given under it; labels already made keep the version they were given under."""
        with self.db.transaction() as tx:
            p = _project(tx, project)
            version = p.guideline_version + 1
            tx.execute("INSERT INTO guidelines (project_id, version, text, created_at) VALUES (?, ?, ?, ?)",
                       (p.id, version, text, self.clock()))
        return version

    def guidelines(self, project: str = DEFAULT_PROJECT, version: int | None = None) -> Guidelines:
        """A version of the project's guidelines (default: the current one)."""
        with self.db.transaction() as tx:
            p = _project(tx, project)
            row = tx.one("SELECT version, text, created_at FROM guidelines WHERE project_id = ? AND version = ?",
                         (p.id, p.guideline_version if version is None else version))
        if row is None:
            raise NotFound(f"project '{project}' has no guidelines version {version}", field="version")
        return Guidelines(row["version"], row["text"], row["created_at"])

    # -- items -----------------------------------------------------------------------------------------------

    def import_file(self, path: str | Path, project: str = DEFAULT_PROJECT) -> int:
        """Import a completions file (:mod:`lmcycle.feedback.items`) into a project; returns the items added.
        The whole file is checked first and stored in one transaction: a bad line stores nothing."""
        return self.add_items(read_completions(path), project)

    def add_items(self, items: Iterable[ItemSpec], project: str = DEFAULT_PROJECT) -> int:
        """Add items to a project in one transaction (all or none); a prompt id already in the project, or
        twice among ``items``, is a :class:`Conflict` naming where it came from."""
        items = list(items)
        now = self.clock()
        with self.db.transaction() as tx:
            p = _project(tx, project)
            for spec in items:
                item_id = tx.value(
                    "INSERT INTO items (project_id, prompt_id, prompt, overlap, gold, meta, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                    (p.id, spec.prompt_id, spec.prompt, spec.overlap or p.overlap,
                     None if spec.gold is None else json.dumps(spec.gold), json.dumps(spec.meta), now))
                if item_id is None:
                    raise Conflict(f"prompt id '{spec.prompt_id}' is already in project '{project}' (nothing was "
                                   "imported)", file=spec.file, line=spec.line, field="prompt_id")
                for position, c in enumerate(spec.completions):
                    tx.execute("INSERT INTO completions (item_id, position, completion_id, text, model, decoding)"
                               " VALUES (?, ?, ?, ?, ?, ?)",
                               (item_id, position, c.id, c.text, c.model, json.dumps(c.decoding)))
        return len(items)

    # -- labeling --------------------------------------------------------------------------------------------

    def next_item_for(self, labeler: str, project: str = DEFAULT_PROJECT) -> Task | None:
        """The item ``labeler`` should label now: their open one (given but not labelled, e.g. after a reload
        or an undo), else a new one with a free slot that they were never given; None when there is none."""
        with self.db.transaction() as tx:
            user = _user(tx, labeler)
            p = _project(tx, project)
            row = tx.one("SELECT a.item_id, a.shown_at, a.guideline_version FROM assignments a"
                         " JOIN items i ON i.id = a.item_id WHERE a.user_id = ? AND i.project_id = ?"
                         " AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.assignment_id = a.id"
                         " AND l.undone_at IS NULL) ORDER BY a.id LIMIT 1", (user.id, p.id))
            if row is not None:
                return _task(tx, row["item_id"], user, row["shown_at"], row["guideline_version"])
            now = self.clock()
            while True:
                free = tx.one("SELECT i.id, COUNT(a.id) AS taken FROM items i LEFT JOIN assignments a"
                              " ON a.item_id = i.id WHERE i.project_id = ? GROUP BY i.id, i.overlap"
                              " HAVING COUNT(a.id) < i.overlap"
                              " AND SUM(CASE WHEN a.user_id = ? THEN 1 ELSE 0 END) = 0 ORDER BY i.id LIMIT 1",
                              (p.id, user.id))
                if free is None:
                    return None
                # slot = how many hold it now; if another labeler took that slot meanwhile, the unique
                # (item_id, slot) makes this insert do nothing, and the next look sees their row
                taken = tx.value("INSERT INTO assignments (item_id, user_id, slot, shown_at, guideline_version)"
                                 " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                                 (free["id"], user.id, free["taken"], now, p.guideline_version))
                if taken is not None:
                    return _task(tx, free["id"], user, now, p.guideline_version)

    def submit(self, labeler: str, item_id: int, label: Label, submission_id: str) -> StoredLabel:
        """Store ``labeler``'s label of item ``item_id`` (one transaction, all checks first) and return it.

        The same ``submission_id`` again returns the label stored the first time and stores nothing (even if it
        was undone since). :class:`NotFound`: no such user or item; :class:`Forbidden`: the item is not assigned
        to this labeler; :class:`Conflict`: they already labelled it (undo first), or the id was used for
        another item; :class:`~lmcycle.errors.LmcycleError`: the label breaks a rule (labels.check_label)."""
        return self.submit_or_replay(labeler, item_id, label, submission_id)[0]

    def submit_or_replay(self, labeler: str, item_id: int, label: Label,
                         submission_id: str) -> tuple[StoredLabel, bool]:
        """:meth:`submit`, also saying whether this was a replay: ``(label, True)`` when ``submission_id`` had
        stored it before (nothing stored now), ``(label, False)`` when it was stored now."""
        if not isinstance(submission_id, str) or not submission_id.strip() or len(submission_id) > MAX_SUBMISSION_ID:
            raise LmcycleError(f"a submission id is a non-empty string of at most {MAX_SUBMISSION_ID} characters",
                               field="submission_id")
        if isinstance(item_id, bool) or not isinstance(item_id, int):
            raise NotFound(f"unknown item id {item_id!r:.40}", field="item_id")
        with self.db.transaction() as tx:
            user = _user(tx, labeler)
            earlier = _replay(tx, submission_id, user, item_id)
            if earlier is not None:
                return earlier, True
            item = tx.one("SELECT i.id, p.rating_scale FROM items i JOIN projects p ON p.id = i.project_id"
                          " WHERE i.id = ?", (item_id,))
            if item is None:
                raise NotFound(f"unknown item id {item_id}", field="item_id")
            assignment = tx.one("SELECT id, shown_at, guideline_version FROM assignments"
                                " WHERE item_id = ? AND user_id = ?", (item_id, user.id))
            if assignment is None:
                raise Forbidden(f"item {item_id} is not assigned to '{labeler}'", field="item_id")
            ids = [r["completion_id"] for r in tx.all("SELECT completion_id FROM completions WHERE item_id = ?"
                                                       " ORDER BY position", (item_id,))]
            check_label(label, ids, _scale(item["rating_scale"]))
            label_id = tx.value(
                "INSERT INTO labels (assignment_id, submission_id, ranking, special, reason, comment,"
                " guideline_version, shown_at, submitted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING RETURNING id",
                (assignment["id"], submission_id, None if label.ranking is None else json.dumps(label.ranking),
                 label.special, label.reason, label.comment, assignment["guideline_version"],
                 assignment["shown_at"], self.clock()))
            if label_id is None:
                # a concurrent twin of this submission won (Postgres: its commit is visible to this statement),
                # or the item already has a live label
                earlier = _replay(tx, submission_id, user, item_id)
                if earlier is not None:
                    return earlier, True
                raise Conflict(f"'{labeler}' already labelled item {item_id}: undo it first", field="item_id")
            for cid, value in label.ratings.items():
                tx.execute("INSERT INTO ratings (label_id, completion_id, value) VALUES (?, ?, ?)",
                           (label_id, cid, value))
            return _labels(tx, "l.id = ?", (label_id,))[0], False

    def undo_last(self, labeler: str, project: str = DEFAULT_PROJECT) -> StoredLabel | None:
        """Undo ``labeler``'s newest live label in the project and give its item back to them, shown anew under
        the current guidelines; returns the undone label, or None when there is nothing to undo."""
        now = self.clock()
        with self.db.transaction() as tx:
            user = _user(tx, labeler)
            p = _project(tx, project)
            last = tx.one("SELECT l.id, l.assignment_id FROM labels l JOIN assignments a ON a.id = l.assignment_id"
                          " JOIN items i ON i.id = a.item_id WHERE a.user_id = ? AND i.project_id = ?"
                          " AND l.undone_at IS NULL ORDER BY l.submitted_at DESC, l.id DESC LIMIT 1",
                          (user.id, p.id))
            if last is None:
                return None
            tx.execute("UPDATE labels SET undone_at = ? WHERE id = ?", (now, last["id"]))
            tx.execute("UPDATE assignments SET shown_at = ?, guideline_version = ? WHERE id = ?",
                       (now, p.guideline_version, last["assignment_id"]))
            return _labels(tx, "l.id = ?", (last["id"],))[0]

    def labels_of(self, labeler: str, project: str = DEFAULT_PROJECT) -> list[StoredLabel]:
        """``labeler``'s live labels in the project, oldest first (nobody else's)."""
        with self.db.transaction() as tx:
            user = _user(tx, labeler)
            p = _project(tx, project)
            return _labels(tx, "u.id = ? AND i.project_id = ? AND l.undone_at IS NULL", (user.id, p.id))

    def label(self, viewer: str, label_id: int) -> StoredLabel:
        """Label ``label_id`` if ``viewer`` made it or is an admin; :class:`Forbidden` if it is another
        labeler's, :class:`NotFound` if there is none."""
        with self.db.transaction() as tx:
            user = _user(tx, viewer)
            found = _labels(tx, "l.id = ?", (label_id,))
        if not found:
            raise NotFound(f"no label {label_id}", field="label_id")
        if found[0].labeler != viewer and user.role != "admin":
            raise Forbidden(f"label {label_id} is not '{viewer}''s", field="label_id")
        return found[0]

    def progress(self, labeler: str, project: str = DEFAULT_PROJECT) -> tuple[int, int]:
        """``(done, left)`` for ``labeler`` in the project, as :func:`lmcycle.feedback.stats.project_stats`
        counts them: live labels; items they hold open plus those they could still be given."""
        with self.db.transaction() as tx:
            user = _user(tx, labeler)
            p = _project(tx, project)
            done = tx.value("SELECT COUNT(*) AS n FROM labels l JOIN assignments a ON a.id = l.assignment_id"
                            " JOIN items i ON i.id = a.item_id WHERE a.user_id = ? AND i.project_id = ?"
                            " AND l.undone_at IS NULL", (user.id, p.id))
            held = tx.value("SELECT COUNT(*) AS n FROM assignments a JOIN items i ON i.id = a.item_id"
                            " WHERE a.user_id = ? AND i.project_id = ? AND NOT EXISTS (SELECT 1 FROM labels l"
                            " WHERE l.assignment_id = a.id AND l.undone_at IS NULL)", (user.id, p.id))
            free = tx.value("SELECT COUNT(*) AS n FROM items i WHERE i.project_id = ?"
                            " AND (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id) < i.overlap"
                            " AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.user_id = ?)",
                            (p.id, user.id))
        return int(done), int(held) + int(free)

    # -- login sessions (the labeling app's) -----------------------------------------------------------------

    def open_session(self, name: str, ttl_s: float, now: float) -> tuple[str, Session]:
        """Log ``name`` in from ``now`` for ``ttl_s`` seconds: ``(token, session)``. The token goes in the
        client's cookie and only its SHA-256 into the database; sessions expired by ``now`` are deleted."""
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.db.transaction() as tx:
            user = _user(tx, name)
            tx.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            tx.execute("INSERT INTO sessions (token_hash, user_id, csrf_token, created_at, expires_at)"
                       " VALUES (?, ?, ?, ?, ?)", (_token_hash(token), user.id, csrf, now, now + ttl_s))
        return token, Session(user, csrf, now + ttl_s)

    def session(self, token: str, now: float) -> Session | None:
        """The session of a cookie's ``token``, or None when it is unknown, logged out or expired by ``now``."""
        with self.db.transaction() as tx:
            row = tx.one("SELECT u.id, u.name, u.role, s.csrf_token, s.expires_at FROM sessions s"
                         " JOIN users u ON u.id = s.user_id WHERE s.token_hash = ? AND s.expires_at > ?",
                         (_token_hash(token), now))
        if row is None:
            return None
        return Session(User(row["id"], row["name"], row["role"]), row["csrf_token"], row["expires_at"])

    def close_session(self, token: str) -> None:
        """Log the session of ``token`` out (nothing happens if there is none)."""
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM sessions WHERE token_hash = ?", (_token_hash(token),))

    def snapshot(self, project: str = DEFAULT_PROJECT) -> Snapshot:
        """Everything export and stats need, read in one transaction so that the figures agree."""
        with self.db.transaction() as tx:
            p = _project(tx, project)
            completions: dict[int, list[Completion]] = {}
            for r in tx.all("SELECT c.* FROM completions c JOIN items i ON i.id = c.item_id"
                            " WHERE i.project_id = ? ORDER BY c.item_id, c.position", (p.id,)):
                completions.setdefault(r["item_id"], []).append(
                    Completion(r["completion_id"], r["text"], r["model"], json.loads(r["decoding"])))
            items = [Item(r["id"], r["prompt_id"], r["prompt"], completions[r["id"]],
                          None if r["gold"] is None else json.loads(r["gold"]), r["overlap"], json.loads(r["meta"]))
                     for r in tx.all("SELECT * FROM items WHERE project_id = ? ORDER BY id", (p.id,))]
            assignments = [(r["item_id"], r["name"]) for r in tx.all(
                "SELECT a.item_id, u.name FROM assignments a JOIN items i ON i.id = a.item_id"
                " JOIN users u ON u.id = a.user_id WHERE i.project_id = ? ORDER BY a.id", (p.id,))]
            labels = _labels(tx, "i.project_id = ? AND l.undone_at IS NULL", (p.id,))
            users = [User(r["id"], r["name"], r["role"]) for r in tx.all("SELECT id, name, role FROM users"
                                                                          " ORDER BY name")]
        return Snapshot(p, items, assignments, labels, users)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _user(tx: Tx, name: str) -> User:
    row = tx.one("SELECT id, name, role FROM users WHERE name = ?", (name,))
    if row is None:
        raise NotFound(f"no user '{name:.70}'", field="labeler")
    return User(row["id"], row["name"], row["role"])


def _project(tx: Tx, name: str) -> Project:
    row = tx.one("SELECT p.*, (SELECT MAX(version) FROM guidelines g WHERE g.project_id = p.id) AS guideline_version"
                 " FROM projects p WHERE p.name = ?", (name,))
    if row is None:
        raise NotFound(f"no project '{name:.70}' (create it with `lmcycle label init --project ...`)",
                       field="project")
    return Project(row["id"], row["name"], row["overlap"], row["too_fast_s"], _scale(row["rating_scale"]),
                   row["guideline_version"])


def _scale(stored: str | None) -> RatingScale | None:
    if stored is None:
        return None
    d = json.loads(stored)
    return RatingScale(d["name"], d["min"], d["max"])


def _task(tx: Tx, item_id: int, user: User, shown_at: float, guideline_version: int) -> Task:
    item = tx.one("SELECT prompt_id, prompt FROM items WHERE id = ?", (item_id,))
    shown = [ShownCompletion(r["completion_id"], r["text"]) for r in tx.all(
        "SELECT completion_id, text FROM completions WHERE item_id = ? ORDER BY position", (item_id,))]
    random.Random(f"{item_id}/{user.id}").shuffle(shown)  # str seeds are stable across runs and processes
    return Task(item_id, item["prompt_id"], item["prompt"], shown, guideline_version, shown_at)


def _replay(tx: Tx, submission_id: str, user: User, item_id: int) -> StoredLabel | None:
    """The label an earlier submission with this id stored, if it was this labeler's for this item; a
    :class:`Conflict` if the id was used otherwise; None if it is new."""
    found = _labels(tx, "l.submission_id = ?", (submission_id,))
    if not found:
        return None
    if found[0].labeler != user.name or found[0].item_id != item_id:
        raise Conflict("this submission id was already used for another submission", field="submission_id")
    return found[0]


def _labels(tx: Tx, where: str, params: tuple) -> list[StoredLabel]:
    """The labels that match ``where`` (over labels l, assignments a, items i, users u), oldest first."""
    rows = tx.all(f"{_LABEL_SELECT} WHERE {where} ORDER BY l.submitted_at, l.id", params)
    ratings: dict[int, dict[str, float]] = {}
    if rows:
        for r in tx.all(f"{_RATING_SELECT} WHERE {where}", params):
            ratings.setdefault(r["label_id"], {})[r["completion_id"]] = r["value"]
    return [StoredLabel(r["id"], r["submission_id"], r["item_id"], r["prompt_id"], r["labeler"],
                        None if r["ranking"] is None else json.loads(r["ranking"]), r["special"], r["reason"],
                        ratings.get(r["id"], {}), r["comment"], r["guideline_version"], r["shown_at"],
                        r["submitted_at"], r["undone_at"]) for r in rows]
