"""Fixtures for the label store's tests: every test that takes ``db_url`` (or ``store``) runs twice, against a
SQLite file and against a real Postgres server.

The Postgres server is ``$LMCYCLE_TEST_POSTGRES_URL`` (``.ci/postgres`` starts the machine's cluster and prints
it; ``.ci/run`` exports it). Each test gets a schema of its own in that database, dropped afterwards, so tests
never see each other's rows. Without the variable, or when the server does not answer, the Postgres variants
skip with the reason, unless ``LMCYCLE_TEST_POSTGRES_REQUIRED=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmcycle.feedback.db import scratch_schema
from lmcycle.feedback.store import LabelStore

POSTGRES_ENV = "LMCYCLE_TEST_POSTGRES_URL"


class ManualClock:
    """The store's clock, moved by hand: timing rules (too fast, undo) are tested without sleeping."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fast_hasher():
    """argon2id at its cheapest settings: the tests make dozens of accounts; the default costs ~0.15 s each."""
    from argon2 import PasswordHasher

    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def _postgres_or_skip() -> str:
    url = os.environ.get(POSTGRES_ENV)
    required = os.environ.get("LMCYCLE_TEST_POSTGRES_REQUIRED") == "1"
    why = None
    if not url:
        why = f"no Postgres server: ${POSTGRES_ENV} is not set (.ci/postgres starts one and prints its URL)"
    else:
        try:
            import psycopg

            psycopg.connect(url, connect_timeout=5).close()
        except Exception as e:  # any failure to reach it is the same skip (or failure) with its reason
            why = f"Postgres at ${POSTGRES_ENV} does not answer: {' '.join(str(e).split())[:200]}"
    if why and required:
        pytest.fail(why + " (LMCYCLE_TEST_POSTGRES_REQUIRED=1)")
    if why:
        pytest.skip(reason=why)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """A database URL nobody else uses: a SQLite file in tmp_path, or a fresh Postgres schema."""
    if request.param == "sqlite":
        yield str(tmp_path / "labels.sqlite")
        return
    with scratch_schema(_postgres_or_skip(), prefix="t") as url:
        yield url


@pytest.fixture
def hasher():
    return fast_hasher()


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def store(db_url, clock, hasher):
    """An initialised store with the default project (overlap 2, toxicity rated 0-1, guidelines v1)."""
    from lmcycle.feedback.labels import RatingScale

    s = LabelStore.init(db_url, clock=clock, hasher=hasher)
    s.create_project(overlap=2, rating_scale=RatingScale("toxicity", 0.0, 1.0), guidelines="# Rank by helpfulness")
    yield s
    s.close()


def _item_row(prompt_id: str, k: int = 3, **extra) -> dict:
    """One completions-file line: ``k`` completions with ids c0.. and distinct texts, plus ``extra`` keys."""
    completions = [{"id": f"c{j}", "text": f"answer {j} to {prompt_id}", "model": "tiny-sft",
                    "decoding": {"do_sample": True, "top_p": 0.9, "seed": j}} for j in range(k)]
    return {"prompt_id": prompt_id, "prompt": f"question {prompt_id}?", "completions": completions, **extra}


def _write_rows(path: Path, rows: list) -> Path:
    """``rows`` as JSON Lines (a str row is written as it is: a malformed line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def item_row():
    """``item_row(prompt_id, k=3, **extra)``: one completions-file line (completions c0.., distinct texts)."""
    return _item_row


@pytest.fixture
def write_rows():
    """``write_rows(path, rows)``: write rows as JSON Lines (a str row as it is)."""
    return _write_rows


@pytest.fixture
def users(store):
    """Labelers ann, bob and cy, and admin root; returns their names."""
    for name in ("ann", "bob", "cy"):
        store.add_user(name, "labeler", f"{name}-password")
    store.add_user("root", "admin", "root-password")
    return ["ann", "bob", "cy"]
