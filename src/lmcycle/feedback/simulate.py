"""Simulated labelers: noisy oracles that rank completions through the labeling app's HTTP API, as people would.

The closed-loop recipe needs labels without people. Each :class:`SimulatedLabeler` knows the task's preference
rule, :func:`oracle_score` (ROUGE-L F1 of a completion against the item's reference summary), and sees it
through Gaussian noise of its own ``noise`` (in score units); a ``random`` labeler ignores the completions and
ranks them uniformly at random, which agreement must single out. Perceived scores within ``tie_tolerance`` of
each other are tied, so rankings carry ties as people's do; an item whose completions are all tied is marked
``not_rankable`` with a reason.

They use nothing but the app's public JSON API (:mod:`lmcycle.feedback.web`): log in, take ``/api/next`` until
it answers 204, submit each label with an id of their own (a retry after a lost reply counts once), so the
loop also exercises sessions, CSRF and idempotent submission. The standard library's ``urllib`` is the client:
a few JSON requests do not warrant a dependency.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lmcycle.errors import LmcycleError

RETRIES = 3  # a connection reset under load is retried with the same submission id


def oracle_score(text: str, reference: str) -> float:
    """The known preference rule: ROUGE-L F1 (stemmed) of ``text`` against ``reference``, in [0, 1]."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, text)["rougeL"].fmeasure


@dataclass(frozen=True)
class SimulatedLabeler:
    """A labeler account and how it ranks: ``noise`` is the standard deviation added to each oracle score;
    ``random`` ranks uniformly at random whatever the completions say."""

    name: str
    password: str
    noise: float = 0.0
    random: bool = False
    tie_tolerance: float = 0.01
    seed: int = 0


def simulated_label(labeler: SimulatedLabeler, task: dict[str, Any], reference: str,
                    rng: random.Random) -> dict[str, Any]:
    """The label ``labeler`` gives the ``/api/next`` item ``task``: a ranking with ties, best first (groups of
    completion ids), or ``not_rankable`` when every completion looks the same to them."""
    ids = [c["id"] for c in task["completions"]]
    if labeler.random:
        perceived = {cid: float(rng.randrange(len(ids))) for cid in ids}  # ties happen as often as by chance
    else:
        perceived = {c["id"]: oracle_score(c["text"], reference) + rng.gauss(0.0, labeler.noise)
                     for c in task["completions"]}
    ordered = sorted(ids, key=lambda cid: -perceived[cid])
    groups: list[list[str]] = []
    for cid in ordered:
        if groups and perceived[groups[-1][0]] - perceived[cid] <= labeler.tie_tolerance:
            groups[-1].append(cid)
        else:
            groups.append([cid])
    if len(groups) == 1:
        return {"ranking": None, "special": "not_rankable", "reason": "the completions are equally good"}
    return {"ranking": groups, "special": None, "reason": ""}


class ApiClient:
    """A logged-in session with the labeling app (its cookie jar and CSRF token)."""

    def __init__(self, base_url: str, name: str, password: str, timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.csrf = ""
        status, body = self.request("POST", "/api/login", {"name": name, "password": password})
        if status != 200:
            raise LmcycleError(f"simulated labeler '{name}' could not log in: HTTP {status} {body}",
                               field="labelers")
        self.csrf = body["csrf_token"]

    def request(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """``(status, decoded JSON body or None)``; HTTP errors are returned, not raised."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "X-CSRF-Token": self.csrf})
        try:
            with self.opener.open(req, timeout=self.timeout_s) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        return status, json.loads(raw) if raw else None

    def submit(self, payload: dict[str, Any]) -> tuple[int, Any]:
        """POST a label, retrying a dropped connection with the same ``submission_id`` (so it counts once)."""
        for attempt in range(RETRIES):
            try:
                return self.request("POST", "/api/labels", payload)
            except (ConnectionError, urllib.error.URLError):
                if attempt == RETRIES - 1:
                    raise
                time.sleep(0.1 * 2 ** attempt)
        raise AssertionError("unreachable")


@dataclass
class LabelerRun:
    """What one simulated labeler did: labels stored, replays answered 200, and each submission's latency."""

    name: str
    submitted: int = 0
    replays: int = 0
    latencies_s: list[float] = field(default_factory=list)


def run_labeler(base_url: str, labeler: SimulatedLabeler, references: dict[str, str],
                max_items: int | None = None) -> LabelerRun:
    """Label items as ``labeler`` until the app has none left for them (or ``max_items``)."""
    rng = random.Random(f"{labeler.seed}:{labeler.name}")
    client = ApiClient(base_url, labeler.name, labeler.password)
    run = LabelerRun(labeler.name)
    while max_items is None or run.submitted < max_items:
        status, task = client.request("GET", "/api/next")
        if status == 204:
            break
        if status != 200:
            raise LmcycleError(f"/api/next answered {status} to '{labeler.name}': {task}", field="labelers")
        label = simulated_label(labeler, task, references.get(task["prompt_id"], ""), rng)
        payload = {"item_id": task["item_id"], "submission_id": f"{labeler.name}-{task['item_id']}",
                   "ratings": {}, "comment": "", **label}
        start = time.perf_counter()
        status, body = client.submit(payload)
        run.latencies_s.append(time.perf_counter() - start)
        if status not in (200, 201):
            raise LmcycleError(f"the app refused a label of '{labeler.name}': HTTP {status} {body}",
                               field="labelers")
        run.submitted += status == 201
        run.replays += status == 200
    return run


def run_labelers(base_url: str, labelers: list[SimulatedLabeler], references: dict[str, str]) -> list[LabelerRun]:
    """Every labeler at once, one thread each (as people work side by side); an error in one is raised."""
    results: dict[str, LabelerRun] = {}
    errors: list[BaseException] = []

    def work(labeler: SimulatedLabeler) -> None:
        try:
            results[labeler.name] = run_labeler(base_url, labeler, references)
        except BaseException as e:  # re-raised in the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(lab,), name=f"labeler-{lab.name}") for lab in labelers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [results[lab.name] for lab in labelers]


@contextlib.contextmanager
def serving(app: Any, host: str = "127.0.0.1", **options: Any) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a free loopback port in a background thread; yields its base URL.
    ``options``: more ``uvicorn.Config`` settings.

    The socket is bound here and handed to uvicorn, so there is no window in which another process could take
    the port. The app's synchronous endpoints run in AnyIO's worker threads (40 at most, its default)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    # log_config=None: uvicorn's dictConfig would close every logging handler of the process (the run's, and
    # absl's, which rouge-score imports and whose close() closes the stream it holds)
    options = {"log_config": None, "log_level": "warning", "access_log": False, **options}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="label-app")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise LmcycleError("the labeling app did not start", field="labelers")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
