"""Load test of the labeling app (``lmcycle label serve``) on loopback, against SQLite and Postgres, and a
check in the database afterwards that no label was lost or stored twice.

    python benchmarks/label_load.py                                  # 20 labelers x 50 each, both backends
    python benchmarks/label_load.py --postgres postgresql://u:pw@127.0.0.1:5432/db --json label-load.json
    python benchmarks/label_load.py --labelers 20 --submissions 10   # a quick check
    python benchmarks/label_load.py --no-postgres                    # SQLite only
    python benchmarks/label_load.py --overlap 1                      # 1000 items, each labelled once

Per backend: a fresh label database (a SQLite file in a temporary folder; a Postgres schema of its own,
dropped afterwards; ``--postgres`` defaults to ``$LMCYCLE_TEST_POSTGRES_URL``) with ``--items`` items of
``--k`` completions at ``--overlap`` labelers each (default k = 4, overlap 3, so labelers race for the slots
of the same items; the items default to :func:`items_needed`, 366 for 20 x 50, with which no labeler can run
out of items before their last submission), and ``--labelers`` accounts (argon2id at its default cost). The
app runs as ``python -m lmcycle.cli label serve`` in a process of its own, so the client threads do not share
its GIL; a Postgres password goes to it in ``PGPASSWORD``, not on its command line.

Each labeler is a thread of this process with its own session (:class:`lmcycle.feedback.simulate.ApiClient`,
urllib, a new connection per request). All log in first; then, timed, each loops {``GET /api/next``, ``POST
/api/labels`` with a fresh ``submission_id``} until ``--submissions`` labels are stored. ``--replays`` of the
submissions (10%; which ones is seeded) are sent twice with the same id: half as a retry after the reply (it
must answer 200 with the same label), half as a twin sent at the same moment from a second connection (exactly
one of the two answers 201, the other 200, both with the same label). A request that fails is counted as an
error and retried with the same id, as the app's clients do.

After the server has stopped, the database is read: live labels must equal labelers x submissions, none lost
(every label id a 2xx reply named is stored, with its submission id), none duplicated (no assignment with two
labels; no item given to more than its overlap or to one labeler twice), and the replays stored nothing (label
rows = distinct submissions). The exit status is 1 when any check fails or a request errored.

Reported: wall time of the labeling loop (logins apart), stored submissions/s, p50/p95/p99 latency of ``POST
/api/labels`` (every POST, replays included) and of ``GET /api/next``, errors, and the checks.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcycle.feedback.db import scratch_schema
from lmcycle.feedback.items import Completion, ItemSpec
from lmcycle.feedback.simulate import ApiClient
from lmcycle.feedback.store import LabelStore

POSTGRES_ENV = "LMCYCLE_TEST_POSTGRES_URL"
PASSWORD = "load-test-password"
REPO = Path(__file__).resolve().parents[1]
ATTEMPTS = 3  # tries per request before a labeler gives up (each failed try is one error)


def item_specs(n: int, k: int) -> list[ItemSpec]:
    """``n`` items ``load-0``.. of ``k`` distinct completions ``c0``.., a few hundred characters each (the
    size of a short summary)."""
    filler = "The meeting moved to Thursday because the venue was double booked; everyone agreed. " * 3
    return [ItemSpec(f"load-{i}", f"Summarize dialogue {i}: {filler}",
                     [Completion(f"c{j}", f"Summary {j} of dialogue {i}. {filler[:80 * (j + 1)]}",
                                 "load-sft") for j in range(k)]) for i in range(n)]


def items_needed(labelers: int, submissions: int, overlap: int) -> int:
    """A number of items of ``overlap`` slots with which each of ``labelers`` stores ``submissions`` labels
    whatever the order of requests: the smallest the argument below guarantees (a bound, not always the
    least).

    A labeler with ``c < submissions`` labels gets nothing (204) only when every free slot is on one of the
    ``c`` items they already had, which hold at most ``(overlap - 1) * c`` of them. The others hold at most
    ``E - submissions`` assignments (``E = labelers * submissions``; nobody takes more than they label), so at
    least ``overlap * I - E + submissions - c`` slots are free, and that exceeds ``(overlap - 1) * c`` for
    every ``c <= submissions - 1`` once ``overlap * I > E + (overlap - 1) * submissions - overlap``. With
    exactly ``ceil(E / overlap)`` items (334 for 20 x 50 at overlap 3) a slow labeler can be left with only
    items they already labelled."""
    total = labelers * submissions
    return (total + (overlap - 1) * submissions - overlap) // overlap + 1


def prepare(db_url: str, *, items: int, k: int, overlap: int, labelers: int, hasher: Any = None) -> list[str]:
    """Create the label database at ``db_url`` with one project, its items and ``labelers`` accounts (password
    :data:`PASSWORD`); returns their names. ``hasher``: the argon2 ``PasswordHasher`` (default: argon2-cffi's
    defaults, what a real deployment uses)."""
    names = [f"labeler{i:02d}" for i in range(labelers)]
    with LabelStore.init(db_url, hasher=hasher) as store:
        store.create_project(overlap=overlap, guidelines="# Rank the summaries, best first")
        store.add_items(item_specs(items, k))
        for name in names:
            store.add_user(name, "labeler", PASSWORD)
    return names


def split_password(url: str) -> tuple[str, str | None]:
    """``(url without its password, the password or None)``: the password then travels in ``PGPASSWORD``,
    which ``ps`` does not show."""
    m = re.match(r"^(postgres(?:ql)?://[^:/@]*):([^@]*)@", url)
    if not m:
        return url, None
    return m.group(1) + "@" + url[m.end():], urllib.parse.unquote(m.group(2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(db_url: str, startup_s: float = 60.0) -> Iterator[str]:
    """``lmcycle label serve`` on ``db_url`` in a process of its own, on a free loopback port; yields its base
    URL once it answers, and stops it afterwards."""
    url, password = split_password(db_url)
    paths = [str(REPO / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    if password is not None:
        env["PGPASSWORD"] = password
    with tempfile.TemporaryFile() as log:
        for _ in range(3):  # the free port may be taken by someone else before the server binds it
            port = _free_port()
            server = subprocess.Popen([sys.executable, "-m", "lmcycle.cli", "label", "serve", "--db", url,
                                       "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=log)
            base = f"http://127.0.0.1:{port}"
            if _wait_ready(base, server, startup_s):
                break
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            if server.poll() is None:
                server.kill()
                server.wait()
                raise RuntimeError(f"the labeling app did not answer within {startup_s:g} s:\n{tail}")
            if "address already in use" not in tail.lower():
                raise RuntimeError(f"the labeling app exited with {server.returncode}:\n{tail}")
        else:
            raise RuntimeError("no free port for the labeling app after 3 tries")
        try:
            yield base
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _wait_ready(base: str, server: subprocess.Popen, startup_s: float) -> bool:
    """Whether the server answers HTTP (any status: 401 from /api/next means it is up); False if it exited."""
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False
        try:
            urllib.request.urlopen(base + "/api/next", timeout=5).close()
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass
class LabelerResult:
    """What one labeler saw: ``acknowledged`` maps each submission id a 2xx reply confirmed to the label id it
    named; ``replays`` holds ``(kind, submission id, statuses, label ids)`` of each deliberate duplicate."""

    name: str
    acknowledged: dict[str, int] = field(default_factory=dict)
    replays: list[tuple[str, str, list[int], list[int]]] = field(default_factory=list)
    post_s: list[float] = field(default_factory=list)
    next_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def replay_plan(names: list[str], submissions: int, fraction: float, seed: int) -> dict[str, dict[int, str]]:
    """Which submissions each labeler sends twice: ``{name: {submission index: "retry" | "twin"}}``, with
    ``round(fraction * submissions)`` per labeler at seeded positions, the kinds alternating over all of them
    (so that a run with one replay per labeler still has both kinds)."""
    count = round(fraction * submissions)
    plan, n = {}, 0
    for name in names:
        picked = sorted(random.Random(f"{seed}:{name}").sample(range(submissions), count))
        plan[name] = {}
        for index in picked:
            plan[name][index] = "retry" if n % 2 == 0 else "twin"
            n += 1
    return plan


def _timed(client: ApiClient, method: str, path: str, payload: Any, into: list[float]) -> tuple[int, Any]:
    start = time.perf_counter()
    try:
        return client.request(method, path, payload)
    finally:
        into.append(time.perf_counter() - start)


def _post(client: ApiClient, payload: dict, out: LabelerResult) -> tuple[int, Any]:
    """POST a label, retrying a failed request with the same submission id (each failure is an error)."""
    for _ in range(ATTEMPTS):
        try:
            status, body = _timed(client, "POST", "/api/labels", payload, out.post_s)
        except OSError as e:  # urllib's URLError, a reset or refused connection, a timeout
            out.errors.append(f"POST /api/labels: {e}")
            continue
        if status in (200, 201):
            out.acknowledged[payload["submission_id"]] = body["id"]
        else:
            out.errors.append(f"POST /api/labels: HTTP {status} {body}")
        return status, body
    return 0, None


def _twin(client: ApiClient, payload: dict, out: LabelerResult) -> list[tuple[int, Any]]:
    """The same submission sent twice at the same moment (two connections, one session)."""
    gate, answers = threading.Barrier(2), [(0, None), (0, None)]

    def send(slot: int) -> None:
        gate.wait()
        answers[slot] = _post(client, payload, out)

    other = threading.Thread(target=send, args=(1,))
    other.start()
    send(0)
    other.join()
    return answers


def run_labeler(base: str, name: str, submissions: int, replays: dict[int, str], start: threading.Barrier,
                seed: int = 0) -> LabelerResult:
    """Log in as ``name``, wait at ``start`` with the others, then store ``submissions`` labels, sending the
    ones ``replays`` names twice."""
    out = LabelerResult(name)
    rng = random.Random(f"{seed}:{name}:labels")
    try:
        client = ApiClient(base, name, PASSWORD)
    except Exception as e:  # still reach the barrier: the other labelers wait there
        out.errors.append(f"login: {e}")
        start.wait()
        return out
    start.wait()
    index = 0
    while index < submissions and len(out.errors) < ATTEMPTS * 5:
        try:
            status, task = _timed(client, "GET", "/api/next", None, out.next_s)
        except OSError as e:
            out.errors.append(f"GET /api/next: {e}")
            continue
        if status == 204:
            out.errors.append(f"GET /api/next: 204 (no item left) after {index} submissions")
            break
        if status != 200:
            out.errors.append(f"GET /api/next: HTTP {status} {task}")
            continue
        ids = [c["id"] for c in task["completions"]]
        rng.shuffle(ids)
        cut = rng.randrange(1, len(ids))  # two groups, so ties, as people give them
        payload = {"item_id": task["item_id"], "submission_id": f"{name}-{index}-{uuid.uuid4().hex[:8]}",
                   "ranking": [ids[:cut], ids[cut:]], "comment": ""}
        kind = replays.get(index)
        if kind == "twin":
            answers = _twin(client, payload, out)
        else:
            answers = [_post(client, payload, out)]
            if kind == "retry":
                answers.append(_post(client, payload, out))
        if kind is not None:
            out.replays.append((kind, payload["submission_id"], [s for s, _ in answers],
                                [b["id"] if isinstance(b, dict) and "id" in b else -1 for _, b in answers]))
        if payload["submission_id"] in out.acknowledged:
            index += 1
    return out


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50, p95 and p99 of ``seconds`` in milliseconds (linear interpolation between order statistics, as
    numpy's default); NaN when there are fewer than two values."""
    if len(seconds) < 2:
        return {"p50_ms": math.nan, "p95_ms": math.nan, "p99_ms": math.nan}
    q = statistics.quantiles([s * 1000 for s in seconds], n=100, method="inclusive")
    return {"p50_ms": q[49], "p95_ms": q[94], "p99_ms": q[98]}


def check_database(db_url: str, results: list[LabelerResult], expected: int) -> dict[str, Any]:
    """Read the label database after a run and compare it with what the clients were told.

    ``lost``: acknowledged labels not stored (by id and submission id); ``duplicated``: label rows beyond one
    per assignment, plus assignments beyond an item's overlap or a second one of an item to the same labeler;
    ``unacknowledged``: stored labels no reply confirmed; ``replays_ok``: deliberate duplicates answered as
    they must be (retry: 201 then 200; twin: one 201 and one 200) with one label id; ``ok``: every check
    passed."""
    with LabelStore.open(db_url) as store:
        snap = store.snapshot()
        with store.db.transaction() as tx:
            rows = tx.all("SELECT id, assignment_id, submission_id, undone_at FROM labels")
            over = tx.value("SELECT COALESCE(SUM(n - overlap), 0) AS extra FROM (SELECT COUNT(a.id) AS n,"
                            " i.overlap FROM items i JOIN assignments a ON a.item_id = i.id"
                            " GROUP BY i.id, i.overlap) t WHERE n > overlap")
    stored = {r["id"]: r["submission_id"] for r in rows}
    acknowledged = {sid: lid for res in results for sid, lid in res.acknowledged.items()}
    lost = sum(stored.get(lid) != sid for sid, lid in acknowledged.items())
    per_assignment = len(rows) - len({r["assignment_id"] for r in rows})
    pairs = len(snap.assignments) - len(set(snap.assignments))
    replays = [r for res in results for r in res.replays]
    good = {"retry": [201, 200], "twin": [200, 201]}
    replays_ok = sum((statuses if kind == "retry" else sorted(statuses)) == good[kind]
                     and len(set(ids)) == 1 and ids[0] == acknowledged.get(sid)
                     for kind, sid, statuses, ids in replays)
    report = {"live_labels": len(snap.labels), "label_rows": len(rows), "expected": expected,
              "undone": sum(r["undone_at"] is not None for r in rows), "lost": lost,
              "duplicated": per_assignment + int(over) + pairs, "unacknowledged": len(set(stored.values())
                                                                                     - set(acknowledged)),
              "assignments": len(snap.assignments), "replays": len(replays), "replays_ok": replays_ok}
    report["ok"] = (report["live_labels"] == report["label_rows"] == expected and lost == 0
                    and report["duplicated"] == 0 and report["unacknowledged"] == 0
                    and replays_ok == len(replays))
    return report


def run_load(db_url: str, *, labelers: int = 20, submissions: int = 50, items: int | None = None, k: int = 4,
             overlap: int = 3, replay_fraction: float = 0.1, seed: int = 0,
             hasher: Any = None) -> dict[str, Any]:
    """One backend's run: prepare ``db_url`` (which must not exist yet, or be an empty Postgres schema), serve
    it in a process of its own, run the labelers, stop the server, check the database.

    ``items`` defaults to :func:`items_needed`. Returns
    the timings (``wall_s`` of the labeling loop, ``login_s``, ``submissions_per_s``, ``post`` and ``next``
    percentiles), ``errors`` (their count and the first few messages) and ``check``
    (:func:`check_database`)."""
    expected = labelers * submissions
    items = items or items_needed(labelers, submissions, overlap)
    names = prepare(db_url, items=items, k=k, overlap=overlap, labelers=labelers, hasher=hasher)
    plan = replay_plan(names, submissions, replay_fraction, seed)
    start = threading.Barrier(labelers + 1)
    results: dict[str, LabelerResult] = {}
    with served(db_url) as base:
        def work(name: str) -> None:
            results[name] = run_labeler(base, name, submissions, plan[name], start, seed)

        threads = [threading.Thread(target=work, args=(n,), name=f"load-{n}") for n in names]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        start.wait()
        t1 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t1
    ordered = [results[n] for n in names]
    posts, nexts = [s for r in ordered for s in r.post_s], [s for r in ordered for s in r.next_s]
    errors = [e for r in ordered for e in r.errors]
    check = check_database(db_url, ordered, expected)
    return {"items": items, "k": k, "overlap": overlap, "labelers": labelers, "submissions": submissions,
            "login_s": t1 - t0, "wall_s": wall, "submissions_per_s": check["live_labels"] / wall,
            "post": {"n": len(posts), **percentiles(posts)}, "next": {"n": len(nexts), **percentiles(nexts)},
            "errors": len(errors), "error_messages": errors[:10], "check": check}


def _postgres_version(url: str) -> str:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SHOW server_version").fetchone()[0]


def main() -> int:
    import sqlite3

    from measure import cpu_name, load_average, version

    from lmcycle.atomic import atomic_write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labelers", type=int, default=20)
    p.add_argument("--submissions", type=int, default=50, help="labels each labeler stores")
    p.add_argument("--overlap", type=int, default=3, help="labelers per item")
    p.add_argument("--items", type=int, help="default: enough that no labeler runs out (366 for "
                   "20 x 50 at overlap 3; 1000 at overlap 1)")
    p.add_argument("--k", type=int, default=4, help="completions per item")
    p.add_argument("--replays", type=float, default=0.1, help="fraction of submissions sent twice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--postgres", default=os.environ.get(POSTGRES_ENV),
                   help=f"Postgres URL (default ${POSTGRES_ENV}); the run uses a fresh schema, dropped "
                   "afterwards")
    p.add_argument("--no-postgres", action="store_true")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    options = dict(labelers=args.labelers, submissions=args.submissions, items=args.items, k=args.k,
                   overlap=args.overlap, replay_fraction=args.replays, seed=args.seed)
    load_start = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append({"backend": f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=FULL)",
                     **run_load(str(Path(tmp) / "labels.sqlite"), **options)})
    if args.postgres and not args.no_postgres:
        with scratch_schema(args.postgres, prefix="label_load") as url:
            backend = f"Postgres {_postgres_version(args.postgres)}"
            rows.append({"backend": backend, **run_load(url, **options)})
    load_end = load_average()
    r0 = rows[0]
    print(f"{r0['labelers']} labelers x {r0['submissions']} submissions ({args.replays:.0%} sent twice), "
          f"{r0['items']} items x k={r0['k']}, overlap {r0['overlap']}; server: `lmcycle label serve` "
          f"(uvicorn, one process); {cpu_name()}, {os.cpu_count()} CPUs; fastapi {version('fastapi')}, "
          f"uvicorn {version('uvicorn')}, psycopg {version('psycopg')}; 1-min load average {load_start:.2f} "
          f"at the start, {load_end:.2f} at the end")
    print("| backend | labels | wall s | submissions/s | POST p50 / p95 / p99 ms "
          "| GET next p50 / p95 / p99 ms | errors | lost | duplicated | replays 200 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c, po, nx = r["check"], r["post"], r["next"]
        print(f"| {r['backend']} | {c['live_labels']} / {c['expected']} | {r['wall_s']:.1f} | "
              f"{r['submissions_per_s']:.1f} | "
              f"{po['p50_ms']:.0f} / {po['p95_ms']:.0f} / {po['p99_ms']:.0f} | "
              f"{nx['p50_ms']:.0f} / {nx['p95_ms']:.0f} / {nx['p99_ms']:.0f} | {r['errors']} | {c['lost']} | "
              f"{c['duplicated']} | {c['replays_ok']} / {c['replays']} |")
    for r in rows:
        for message in r["error_messages"]:
            print(f"{r['backend']}: {message}")
    if args.json:
        atomic_write_json(args.json, {"load_average": [load_start, load_end], "rows": rows})
    failed = [r["backend"] for r in rows if r["errors"] or not r["check"]["ok"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
