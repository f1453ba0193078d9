"""The labeling app's behaviour: the JSON API and the pages, on SQLite and Postgres (``store`` runs on both)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import pytest
from labelapp import GUIDELINES, add_items, card_order, client, hidden_fields, login, page_login
from loopback import running

from lmcycle.cli.main import main
from lmcycle.data.preferences import load_rankings
from lmcycle.feedback.items import Completion, ItemSpec
from lmcycle.feedback.stats import project_stats
from lmcycle.feedback.web import create_app


@pytest.fixture
def app(store, users, clock):
    return create_app(store, clock=clock)


def _count(store, table: str) -> int:
    with store.db.transaction() as tx:
        return tx.value(f"SELECT COUNT(*) AS n FROM {table}")


def test_a_labeler_ranks_with_a_tie_replays_undoes_and_ranks_again(store, app):
    first, second = add_items(store)
    with client(app) as ann:
        csrf = login(ann, "ann")
        r = ann.get("/api/next")
        task = r.json()
        assert r.status_code == 200 and task["item_id"] == first and task["prompt"] == "question 1?"
        # the store's shuffle for ann, not file order; no model names reach the labeler
        assert [c["id"] for c in task["completions"]] == [c.id for c in store.next_item_for("ann").completions]
        assert set(task["completions"][0]) == {"id", "text"}
        assert (task["guideline_version"], task["rating_scale"], task["progress"]) == (
            1, {"name": "toxicity", "min": 0.0, "max": 1.0}, {"done": 0, "left": 2})
        a, b, c = (x["id"] for x in task["completions"])
        body = {"item_id": first, "submission_id": "ann-1", "ranking": [[a], [b, c]], "special": None,
                "reason": "", "ratings": {a: 0.25}, "comment": "b and c are as good"}
        r = ann.post("/api/labels", json=body, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 201, r.text
        stored = r.json()
        assert (stored["item_id"], stored["ranking"], stored["special"], stored["ratings"], stored["labeler"]) == (
            first, [[a], [b, c]], None, {a: 0.25}, "ann")
        replay = ann.post("/api/labels", json=body, headers={"X-CSRF-Token": csrf})
        assert (replay.status_code, replay.json()) == (200, stored)
        assert [lab.id for lab in store.labels_of("ann")] == [stored["id"]]
        assert ann.get("/api/next").json()["progress"] == {"done": 1, "left": 1}

        undone = ann.post("/api/undo", headers={"X-CSRF-Token": csrf})
        assert undone.status_code == 200 and undone.json()["id"] == stored["id"] and undone.json()["undone_at"]
        assert store.labels_of("ann") == []
        again = ann.get("/api/next").json()
        assert again["item_id"] == first and again["progress"] == {"done": 0, "left": 2}
        r = ann.post("/api/labels", headers={"X-CSRF-Token": csrf},
                     json={**body, "submission_id": "ann-1b", "ranking": [[c], [a], [b]], "ratings": {}})
        assert r.status_code == 201 and r.json()["id"] != stored["id"]
        # a different submission for an item already labelled: undo first
        r = ann.post("/api/labels", json={**body, "submission_id": "ann-1c"}, headers={"X-CSRF-Token": csrf})
        assert (r.status_code, r.json()["field"]) == (409, "item_id")
        assert [lab.ranking for lab in store.labels_of("ann")] == [[[c], [a], [b]]]
        listed = ann.get("/api/labels").json()
        assert [lab["submission_id"] for lab in listed] == ["ann-1b"]
        assert ann.get(f"/api/labels/{listed[0]['id']}").json()["ranking"] == [[c], [a], [b]]
        assert ann.post("/api/undo", headers={"X-CSRF-Token": csrf}).status_code == 200
        nothing = ann.post("/api/undo", headers={"X-CSRF-Token": csrf})
        assert (nothing.status_code, nothing.json()) == (404, {"error": "nothing to undo", "field": None})


@pytest.mark.parametrize("change, field", [
    ({"ranking": None, "special": "unsafe", "reason": "  "}, "reason"),
    ({"ranking": None, "special": "not_rankable", "reason": ""}, "reason"),
    ({"ranking": [["c0"], ["c1"]]}, "ranking"),  # skips c2
    ({"ranking": [["c0"], ["c1"], ["c2"], ["c9"]]}, "ranking"),
    ({"special": "unsafe", "reason": "both given"}, "ranking"),
    ({"ranking": [["c0", "c1", "c2"]], "ratings": {"c0": 1.5}}, "ratings.c0"),
    ({"ranking": [["c0", "c1", "c2"]], "colour": "red"}, "colour"),
    ({"submission_id": ""}, "submission_id"),
], ids=["unsafe-blank-reason", "not-rankable-no-reason", "skips", "unknown-id", "both", "rating-range",
        "unknown-key", "no-submission-id"])
def test_a_bad_label_is_400_naming_the_field_and_stores_nothing(store, app, change, field):
    (item, _) = add_items(store)
    with client(app) as ann:
        csrf = login(ann, "ann")
        assert ann.get("/api/next").json()["item_id"] == item
        body = {"item_id": item, "submission_id": "s1", "ranking": [["c0"], ["c1", "c2"]], **change}
        r = ann.post("/api/labels", json=body, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 400 and r.json()["field"] == field, r.text
        assert r.json()["error"]
    assert _count(store, "labels") == 0 and _count(store, "ratings") == 0


def test_forged_and_foreign_item_ids_are_refused_and_store_nothing(store, app):
    first, second = add_items(store)
    with client(app) as ann:
        csrf = login(ann, "ann")
        assert ann.get("/api/next").json()["item_id"] == first
        label = {"ranking": [["c0", "c1", "c2"]]}
        for item_id, status in ((second, 403), (99_999, 404), (str(first), 404), (None, 404), (True, 404)):
            r = ann.post("/api/labels", json={"item_id": item_id, "submission_id": f"s-{item_id}", **label},
                         headers={"X-CSRF-Token": csrf})
            assert (r.status_code, r.json()["field"]) == (status, "item_id"), (item_id, r.text)
    assert _count(store, "labels") == 0


def test_a_labeler_reads_only_their_own_labels(store, app):
    add_items(store)
    with client(app) as ann, client(app) as bob, client(app) as root:
        ann_csrf, bob_csrf = login(ann, "ann"), login(bob, "bob")
        login(root, "root")
        item = bob.get("/api/next").json()["item_id"]
        r = bob.post("/api/labels", json={"item_id": item, "submission_id": "b1", "ranking": [["c0", "c1", "c2"]]},
                     headers={"X-CSRF-Token": bob_csrf})
        theirs = r.json()["id"]
        r = ann.get(f"/api/labels/{theirs}")
        assert (r.status_code, r.json()["field"]) == (403, "label_id")
        assert ann.get("/api/labels/99999").status_code == 404
        r = ann.get("/api/labels/first")
        assert (r.status_code, r.json()["field"]) == (400, "label_id")
        assert ann.get("/api/labels").json() == []
        assert root.get(f"/api/labels/{theirs}").json()["labeler"] == "bob"  # an admin reads everyone's
        # bob's label is not ann's to undo either
        assert ann.post("/api/undo", headers={"X-CSRF-Token": ann_csrf}).status_code == 404
    assert [lab.id for lab in store.labels_of("bob")] == [theirs]


def test_the_admin_side_is_for_admins(store, app, tmp_path):
    add_items(store)
    with client(app) as ann, client(app) as root, client(app) as nobody:
        csrf = login(ann, "ann")
        for path in ("/api/stats", "/api/export?format=rankings"):
            assert nobody.get(path).status_code == 401
            r = ann.get(path)
            assert (r.status_code, r.json()) == (403, {"error": "admins only", "field": None})
        for path in ("/admin", "/admin/export?format=jsonl", "/admin/agreement.png"):
            assert ann.get(path).status_code == 403 and "admins only" in ann.get(path).text
            r = nobody.get(path)
            assert (r.status_code, r.headers["location"]) == (303, "/login")

        login(root, "root")
        assert root.get("/api/export").json()["error"].endswith("has no labels to export yet")
        item = ann.get("/api/next").json()["item_id"]
        ann.post("/api/labels", json={"item_id": item, "submission_id": "a1", "ranking": [["c2"], ["c0", "c1"]]},
                 headers={"X-CSRF-Token": csrf})
        stats = root.get("/api/stats").json()
        assert stats["overall"] == project_stats(store.snapshot())["overall"] and stats["overall"]["done"] == 1
        r = root.get("/admin/export?format=rankings")
        assert r.headers["content-disposition"] == 'attachment; filename="default-rankings.jsonl"'
        (tmp_path / "r.jsonl").write_bytes(r.content)
        (ranking,) = load_rankings(tmp_path / "r.jsonl")
        assert (ranking.prompt_id, ranking.ranks, ranking.labeler) == ("p1", [2, 2, 1], "ann")
        raw = root.get("/api/export?format=jsonl")
        assert json.loads(raw.text)["ranking"] == [["c2"], ["c0", "c1"]]
        r = root.get("/api/export?format=parquet")
        assert (r.status_code, r.json()["field"]) == (400, "format")
        page = root.get("/admin")
        assert page.status_code == 200 and 'data-testid="labeler-ann"' in page.text
        assert 'href="/admin/export?format=rankings"' in page.text


def test_the_admin_page_shows_agreement_per_labeler(store, app, tmp_path):
    pytest.importorskip("lmcycle.feedback.agreement")
    add_items(store)
    with client(app) as root:
        for name, ranking in (("ann", [["c0"], ["c1"], ["c2"]]), ("bob", [["c0"], ["c2"], ["c1"]])):
            with client(app) as c:
                csrf = login(c, name)
                while (r := c.get("/api/next")).status_code == 200:
                    c.post("/api/labels", json={"item_id": r.json()["item_id"], "ranking": ranking,
                                                "submission_id": f"{name}-{r.json()['item_id']}"},
                           headers={"X-CSRF-Token": csrf})
        login(root, "root")
        page = root.get("/admin").text
        table = page[page.index('id="agreement-labelers"'):]
        assert "<td>ann</td>" in table and "<td>bob</td>" in table and "loo_tau_b" in table
        # tau-b of c0 > c1 > c2 against c0 > c2 > c1: 2 concordant pairs, 1 discordant, (2 - 1) / 3
        assert table.count("<td>0.333</td>") >= 4  # mean and leave-one-out tau-b of each
        png = root.get("/admin/agreement.png")
        assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
        (tmp_path / "agreement.png").write_bytes(png.content)


def test_the_admin_page_says_why_agreement_is_missing_and_still_shows_the_stats(store, app, monkeypatch):
    pytest.importorskip("lmcycle.feedback.agreement")
    add_items(store)
    monkeypatch.setitem(sys.modules, "krippendorff", None)  # an install without it: import fails
    with client(app) as ann, client(app) as bob, client(app) as root:
        for c, name in ((ann, "ann"), (bob, "bob")):  # two labelers of one item: alpha has a unit to compute
            csrf = login(c, name)
            item = c.get("/api/next").json()["item_id"]
            c.post("/api/labels", json={"item_id": item, "submission_id": name, "ranking": [["c0"], ["c1", "c2"]]},
                   headers={"X-CSRF-Token": csrf})
        login(root, "root")
        page = root.get("/admin")
        assert page.status_code == 200 and 'data-testid="labeler-bob"' in page.text
        assert "needs the krippendorff package" in page.text.partition(' id="agreement-error"')[2]
        assert root.get("/admin/agreement.png").status_code == 404
        assert "krippendorff" in root.get("/api/stats").json()["agreement"]["error"]


def test_nothing_left_is_204_and_a_page_that_says_so(store, app):
    add_items(store, n=1)
    with client(app) as ann:
        csrf = login(ann, "ann")
        item = ann.get("/api/next").json()["item_id"]
        ann.post("/api/labels", json={"item_id": item, "submission_id": "a1", "special": "unsafe",
                                      "reason": "it insults the reader"}, headers={"X-CSRF-Token": csrf})
        r = ann.get("/api/next")
        assert (r.status_code, r.content) == (204, b"")
        page = ann.get("/").text
        assert 'data-testid="nothing-left"' in page and "done 1 / left 0" in page and 'id="label-form"' not in page
    (label,) = store.labels_of("ann")
    assert (label.special, label.reason, label.ranking) == ("unsafe", "it insults the reader", None)


def test_the_labeling_page_shows_the_item_with_its_controls(store, app):
    store.set_guidelines(GUIDELINES)
    add_items(store, n=2, k=4)
    with client(app) as ann:
        page_login(ann, "ann")
        page = ann.get("/").text
    shown = [c.id for c in store.next_item_for("ann").completions]
    assert card_order(page) == shown and sorted(shown) == ["c0", "c1", "c2", "c3"]
    for cid in shown:
        assert f'data-testid="rank-{cid}"' in page and f'data-testid="rating-{cid}"' in page
    for testid in ("submit", "undo", "not-rankable", "unsafe", "reason", "comment", "progress"):
        assert f'data-testid="{testid}"' in page, testid
    assert 'data-k="4"' in page and "done 0 / left 2" in page and "toxicity (0&ndash;1)" in page
    assert 'data-testid="guideline-version">2<' in page
    assert "<h2>Rank by helpfulness</h2>" in page and "<strong>Best</strong>" in page and "<em>ties</em>" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "<img src=x" not in page


def test_a_page_shows_the_cards_of_the_labelers_own_shuffle(store, app):
    add_items(store, n=1, k=6)
    orders = []
    for name in ("ann", "bob"):
        with client(app) as c:
            page_login(c, name)
            orders.append(card_order(c.get("/").text))
    # fixed per labeler and item, different between labelers (6! orders: a clash would be a 1/720 fluke)
    assert sorted(orders[0]) == sorted(orders[1]) == [f"c{j}" for j in range(6)] and orders[0] != orders[1]


def test_a_project_without_a_rating_scale_shows_no_rating_inputs(store, users, clock):
    store.create_project("plain", overlap=1, guidelines="Rank them.")
    store.add_items([ItemSpec("q1", "prompt?", [Completion("x", "one", "m"), Completion("y", "two", "m")])], "plain")
    with client(create_app(store, project="plain", clock=clock)) as ann:
        login(ann, "ann")
        assert ann.get("/api/next").json()["rating_scale"] is None
        page = ann.get("/").text
    assert 'data-testid="rank-x"' in page and "rating-input" not in page and "<p>Rank them.</p>" in page


def test_the_page_form_ranks_with_ties_survives_a_double_click_and_undo_reopens(store, app):
    first, _ = add_items(store)
    with client(app) as ann:
        page_login(ann, "ann")
        page = ann.get("/").text
        a, b, c = card_order(page)
        form = {**hidden_fields(page, "label-form"), "action": "rank", f"rank-{a}": "1", f"rank-{b}": "3",
                f"rank-{c}": "3", f"rating-{b}": "0.5", f"rating-{c}": "", "comment": "b, c tie", "reason": ""}
        assert form["item_id"] == str(first)
        for _ in range(2):  # the second post is a double click: the same submission id
            r = ann.post("/label", data=form)
            assert (r.status_code, r.headers["location"]) == (303, "/?notice=saved")
        (label,) = store.labels_of("ann")
        assert (label.item_id, label.ranking, label.ratings, label.comment) == (first, [[a], [b, c]], {b: 0.5},
                                                                                 "b, c tie")
        assert "Saved. Here is your next item." in ann.get("/?notice=saved").text
        unknown = ann.get("/?notice=%3Cb%3Eforged%3C%2Fb%3E").text  # only the known notices can be shown
        assert 'data-testid="notice"' not in unknown and "forged" not in unknown

        r = ann.post("/undo", data=hidden_fields(page, "undo-form"))
        assert (r.status_code, r.headers["location"]) == (303, "/?notice=undone")
        assert store.labels_of("ann") == []
        again = ann.get("/?notice=undone").text
        assert hidden_fields(again, "label-form")["item_id"] == str(first)
        assert "Your last submission was undone" in again


def test_a_bad_form_is_shown_again_with_the_error_and_stores_nothing(store, app):
    add_items(store)
    with client(app) as ann:
        page_login(ann, "ann")
        page = ann.get("/").text
        a, b, c = card_order(page)
        form = {**hidden_fields(page, "label-form"), "action": "unsafe", "reason": " ", "comment": "keep me",
                f"rank-{a}": "1"}
        r = ann.post("/label", data=form)
        assert r.status_code == 400 and "field &#39;reason&#39;: a &#39;unsafe&#39; label needs a reason" in r.text
        assert ">keep me</textarea>" in r.text  # what was typed is kept
        assert re.search(rf'name="rank-{a}"[^>]*value="1"', r.text) and not re.search(rf'name="rank-{b}"[^>]*value="1"', r.text)
        # the same submission id comes back, so that the corrected form still counts once
        assert hidden_fields(r.text, "label-form")["submission_id"] == form["submission_id"]
        r = ann.post("/label", data={**form, "action": "rank"})  # b and c unranked
        assert r.status_code == 400 and "skips completion(s)" in r.text
        r = ann.post("/label", data={**form, "action": "rank", f"rank-{b}": "first"})
        assert r.status_code == 400 and "a rank is a whole number" in r.text
        r = ann.post("/label", data={**form, "action": "rank", f"rank-{b}": "2", f"rank-{c}": "2",
                                     f"rating-{a}": "nan"})
        assert r.status_code == 400 and f"ratings.{a}" in r.text
        assert _count(store, "labels") == 0
        r = ann.post("/label", data={**form, "reason": "threatens someone"})
        assert r.status_code == 303
    (label,) = store.labels_of("ann")
    assert (label.special, label.reason, label.comment) == ("unsafe", "threatens someone", "keep me")


def test_page_login_and_logout(store, app):
    add_items(store)
    with client(app) as root, client(app) as ann:
        token = hidden_fields(root.get("/login").text, "login-form")["csrf_token"]
        r = root.post("/login", data={"name": "root", "password": "wrong-password", "csrf_token": token})
        assert r.status_code == 401 and "wrong name or password" in r.text and 'value="root"' in r.text
        token = hidden_fields(r.text, "login-form")["csrf_token"]
        r = root.post("/login", data={"name": "root", "password": "root-password", "csrf_token": token})
        assert (r.status_code, r.headers["location"]) == (303, "/admin")
        assert root.get("/login").headers["location"] == "/"  # already logged in
        page_login(ann, "ann")
        assert ann.get("/").status_code == 200 and ann.get("/api/next").status_code == 200
        r = ann.post("/logout", data=hidden_fields(ann.get("/").text, "logout-form"))
        assert (r.status_code, r.headers["location"]) == (303, "/login")
        assert ann.get("/api/next").status_code == 401 and ann.get("/").headers["location"] == "/login"
    assert _count(store, "sessions") == 1  # root's


def test_progress_counts_as_the_stats_do(store, users):
    add_items(store, n=3)
    store.add_items([ItemSpec("solo", "q", [Completion("x", "1", "m"), Completion("y", "2", "m")], overlap=1)])

    def check():
        stats = {r["labeler"]: (r["done"], r["left"]) for r in project_stats(store.snapshot())["labelers"]}
        assert {name: store.progress(name) for name in users} == stats
        return stats

    assert check()["ann"] == (0, 4)
    task = store.next_item_for("ann")
    store.submit("ann", task.item_id, _tie_all(task), "a1")
    store.next_item_for("ann")  # held open: still left
    assert check()["ann"] == (1, 3)
    while (task := store.next_item_for("bob")) is not None:
        store.submit("bob", task.item_id, _tie_all(task), f"b{task.item_id}")
    # bob labelled all 4; ann holds p2 and may still take p3; cy finds p1 and p2 full (overlap 2), solo
    # full (overlap 1), and may take p3
    assert check() == {"ann": (1, 2), "bob": (4, 0), "cy": (0, 1)}


def _tie_all(task):
    from lmcycle.feedback.labels import Label

    return Label(ranking=[[c.id for c in task.completions]])


def test_many_labelers_at_once_over_real_http(store, users, clock):
    """uvicorn with its worker threads: every item reaches exactly its overlap of labelers, once each."""
    add_items(store, n=6)
    app = create_app(store, clock=clock)
    errors: list[BaseException] = []

    def label_all(name: str) -> None:
        try:
            with httpx.Client(base_url=url, timeout=30) as c:
                csrf = c.post("/api/login", json={"name": name, "password": f"{name}-password"}).json()["csrf_token"]
                while (r := c.get("/api/next")).status_code == 200:
                    task = r.json()
                    body = {"item_id": task["item_id"], "submission_id": f"{name}-{task['item_id']}",
                            "ranking": [[x["id"] for x in task["completions"]]]}
                    for _ in range(2):  # the retry of a lost reply
                        assert c.post("/api/labels", json=body, headers={"X-CSRF-Token": csrf}).status_code in (
                            200, 201)
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    with running(app) as url:
        threads = [threading.Thread(target=label_all, args=(name,)) for name in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert errors == []
    per_item = {}
    for lab in store.snapshot().labels:
        per_item.setdefault(lab.item_id, []).append(lab.labeler)
    assert sorted(len(set(who)) for who in per_item.values()) == [2] * 6 and _count(store, "labels") == 12


def test_label_serve_starts_uvicorn_and_answers(tmp_path, capsys):
    db = str(tmp_path / "labels.sqlite")
    assert main(["label", "init", "--db", db]) == 0
    assert main(["label", "serve", "--db", db, "--project", "nope"]) == 1
    assert "no project 'nope'" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "lmcycle.cli", "label", "serve", "--db", db, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, r = time.monotonic() + 60, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/login", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert r is not None, server.communicate(timeout=10)[0] if server.poll() is not None else "no answer"
        assert r.status_code == 200 and 'id="login-form"' in r.text
        assert r.headers["x-frame-options"] == "DENY"
    finally:
        server.terminate()
        out = server.communicate(timeout=30)[0]
    assert f"on http://127.0.0.1:{port}/" in out


def test_the_store_opens_sessions_for_known_users_only(store, users, clock):
    token, session = store.open_session("ann", 60.0, clock())
    assert store.session(token, clock()) == session and session.user.name == "ann"
    assert store.session(token, clock() + 60.0) is None  # expired at exactly ttl
    store.close_session(token)
    assert store.session(token, clock()) is None
    with pytest.raises(Exception, match="no user 'zed'"):
        store.open_session("zed", 60.0, clock())
    # a login deletes the sessions that have expired by then
    store.open_session("bob", 10.0, clock())
    store.open_session("cy", 100.0, clock() + 50)
    assert _count(store, "sessions") == 1


def test_create_app_checks_its_settings(store):
    from lmcycle.errors import LmcycleError

    with pytest.raises(LmcycleError, match="login_limit"):
        create_app(store, login_limit=(0, 60.0))
    with pytest.raises(LmcycleError, match="session_ttl_s"):
        create_app(store, session_ttl_s=0)
    with pytest.raises(LmcycleError, match="no project 'other'"):
        create_app(store, project="other")


def test_ended_worker_threads_leave_no_open_connections(store, users):
    """A web server's worker threads come and go; each one's connection is closed once it has ended, so a
    long-running app does not pile up database connections (Postgres refuses past max_connections)."""
    seen = []

    def work():
        store.progress("ann")
        seen.append(store.db._local.conn)

    for _ in range(5):
        t = threading.Thread(target=work)
        t.start()
        t.join()
    # each new thread's first query closed what the threads before it left; the last one's waits for the next
    assert len(store.db._connections) == 2
    for conn in seen[:-1]:
        with pytest.raises(Exception, match="closed"):
            conn.execute("SELECT 1")
