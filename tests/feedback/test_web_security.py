"""The labeling app's security: CSRF on every state change, sessions that expire and cannot be forged from
the database, login throttling, escaped output with no inline code, the headers and cookie flags."""

from __future__ import annotations

import hashlib
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from labelapp import (
    GUIDELINES,
    XSS,
    XSS_ESCAPED,
    add_items,
    client,
    hidden_fields,
    login,
    page_login,
)

from lmcycle.feedback.guards import LoginLimiter
from lmcycle.feedback.safe_markdown import render_markdown
from lmcycle.feedback.web import create_app

# written out here, not imported: the test must fail if the app's policy drifts
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
STATE_CHANGING = {"/api/labels", "/api/undo", "/label", "/undo", "/logout"}  # beside the two logins


@pytest.fixture
def app(store, users, clock):
    return create_app(store, clock=clock, login_limit=(3, 60.0), session_ttl_s=3600)


def _count(store, table: str) -> int:
    with store.db.transaction() as tx:
        return tx.value(f"SELECT COUNT(*) AS n FROM {table}")


def test_every_state_changing_request_needs_the_sessions_csrf_token(store, app):
    posts = {route.path for route in app.routes for m in getattr(route, "methods", ()) or ()
             if m in ("POST", "PUT", "PATCH", "DELETE")}
    assert posts - {"/api/login", "/login"} == STATE_CHANGING  # a new route must be added to this test
    (item, _) = add_items(store)
    with client(app) as ann, client(app) as bob:
        ann_csrf, bob_csrf = login(ann, "ann"), login(bob, "bob")
        assert ann.get("/api/next").json()["item_id"] == item
        ann.post("/api/labels", json={"item_id": item, "submission_id": "kept", "ranking": [["c0", "c1", "c2"]]},
                 headers={"X-CSRF-Token": ann_csrf})
        page = ann.get("/").text  # the next item's form
        label = {"item_id": item, "submission_id": "forged", "ranking": [["c0"], ["c1", "c2"]]}
        for token in (None, "", "not-the-token", bob_csrf):  # none, empty, made up, another session's
            headers = {} if token is None else {"X-CSRF-Token": token}
            for path in ("/api/labels", "/api/undo"):
                r = ann.post(path, json=label, headers=headers)
                assert (r.status_code, r.json()["field"]) == (403, "X-CSRF-Token"), (path, token)
            fields = {**hidden_fields(page, "label-form"), "action": "rank", "rank-c0": "1", "rank-c1": "2",
                      "rank-c2": "2"}
            fields.pop("csrf_token")
            if token is not None:
                fields["csrf_token"] = token
            for path in ("/label", "/undo", "/logout"):
                r = ann.post(path, data=fields)
                assert r.status_code == 403 and "csrf_token" in r.text, (path, token)
        # nothing changed: one label (not undone), ann still logged in
        assert [lab.submission_id for lab in store.labels_of("ann")] == ["kept"]
        assert ann.get("/api/next").status_code == 200


def test_an_expired_session_is_401_and_stores_nothing(store, app, clock):
    (item, _) = add_items(store)
    with client(app) as ann:
        csrf = login(ann, "ann")
        assert ann.get("/api/next").json()["item_id"] == item
        clock.advance(3599)
        assert ann.get("/api/guidelines").status_code == 200
        clock.advance(1)  # the session lasted exactly session_ttl_s
        r = ann.post("/api/labels", json={"item_id": item, "submission_id": "late", "ranking": [["c0", "c1", "c2"]]},
                     headers={"X-CSRF-Token": csrf})
        assert r.status_code == 401 and r.json()["error"].startswith("not logged in, or the session expired")
        assert ann.post("/api/undo", headers={"X-CSRF-Token": csrf}).status_code == 401
        assert ann.get("/api/next").status_code == 401
        r = ann.get("/")
        assert (r.status_code, r.headers["location"]) == (303, "/login")
        assert ann.get("/login").status_code == 200  # the expired cookie does not count as logged in
    assert _count(store, "labels") == 0


def test_neither_an_unknown_cookie_nor_the_stored_hash_logs_anyone_in(store, app):
    with client(app) as ann:
        login(ann, "ann")
        token = ann.cookies["lmcycle_session"]
        with store.db.transaction() as tx:
            (row,) = tx.all("SELECT * FROM sessions")
        # the database holds the token's SHA-256, never the token
        assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
        assert token not in {str(v) for v in row.values()}
    for cookie in (row["token_hash"], "x" * 43, "x" * 5000):
        with client(app) as thief:
            thief.cookies.set("lmcycle_session", cookie)
            assert thief.get("/api/next").status_code == 401
            assert thief.get("/").headers["location"] == "/login"


def test_failed_logins_are_throttled_per_address_and_name(store, app, clock):
    with client(app, "10.0.0.1") as c, client(app, "10.0.0.2") as other:
        for _ in range(3):
            r = c.post("/api/login", json={"name": "ann", "password": "guess-guess"})
            assert (r.status_code, r.json()) == (401, {"error": "wrong name or password", "field": None})
        r = c.post("/api/login", json={"name": "ann", "password": "ann-password"})  # even the right one
        assert r.status_code == 429 and r.headers["retry-after"] == "60" and "lmcycle_session" not in r.cookies
        token = hidden_fields(c.get("/login").text, "login-form")["csrf_token"]
        r = c.post("/login", data={"name": "ann", "password": "ann-password", "csrf_token": token})
        assert r.status_code == 429 and "too many failed logins" in r.text and r.headers["retry-after"] == "60"
        # another name from that address, and the same name from another address, are not held back
        assert c.post("/api/login", json={"name": "bob", "password": "bob-password"}).status_code == 200
        assert other.post("/api/login", json={"name": "ann", "password": "ann-password"}).status_code == 200
        clock.advance(45)
        assert c.post("/api/login", json={"name": "ann", "password": "ann-password"}).headers["retry-after"] == "15"
        clock.advance(15)  # the failures left the window
        assert c.post("/api/login", json={"name": "ann", "password": "ann-password"}).status_code == 200
    assert _count(store, "sessions") == 2  # c's login as ann ended its session as bob


def test_the_login_limiter_counts_failures_in_a_sliding_window(clock):
    limiter = LoginLimiter(2, 10.0, clock, max_keys=3)
    limiter.failed("a")
    clock.advance(4)
    limiter.failed("a")
    clock.advance(1)
    assert limiter.retry_after("a") == 5.0  # the first failure (t=0) leaves the window at t=10; now t=5
    assert limiter.retry_after("b") is None
    clock.advance(5)
    assert limiter.retry_after("a") is None  # one failure (t=4) left in the window
    limiter.failed("a")
    assert limiter.retry_after("a") == 4.0  # t=4 leaves at 14; now 10
    limiter.succeeded("a")
    assert limiter.retry_after("a") is None
    for key in ("k1", "k2", "k3"):
        limiter.failed(key)
    clock.advance(10)
    limiter.failed("k4")  # 4 keys > max_keys: k1..k3 have nothing left in the window and go
    assert set(limiter._failures) == {"k4"}


def test_a_login_needs_a_json_object_of_strings(store, app):
    with client(app) as c:
        for body, field in (({"name": "ann"}, "password"), ([], "name"), ({"name": 1, "password": "x"}, "name")):
            r = c.post("/api/login", json=body)
            assert (r.status_code, r.json()["field"]) == (400, field)
        r = c.post("/api/login", content=b"{not json", headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["field"]) == (400, "body")
        # a cross-site form can post only form encodings, and the API takes none
        r = c.post("/api/login", data={"name": "ann", "password": "ann-password"})
        assert (r.status_code, r.json()["field"]) == (415, "Content-Type")
        r = c.post("/api/login", content=b"[" * (1 << 20) + b"]", headers={"Content-Type": "application/json"})
        assert r.status_code == 413
    assert _count(store, "sessions") == 0


def test_the_login_form_needs_its_double_submit_token(store, app):
    with client(app) as c:
        r = c.get("/login")
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("lmcycle_login_csrf=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
        token = hidden_fields(r.text, "login-form")["csrf_token"]
        for form_token in ("", "forged"):
            r = c.post("/login", data={"name": "ann", "password": "ann-password", "csrf_token": form_token})
            assert r.status_code == 403 and "lmcycle_session" not in r.headers.get("set-cookie", "")
    with client(app) as fresh:  # a token of the page but not this browser's cookie (a login CSRF attempt)
        r = fresh.post("/login", data={"name": "ann", "password": "ann-password", "csrf_token": token})
        assert r.status_code == 403
    assert _count(store, "sessions") == 0


def test_hostile_text_is_escaped_everywhere_it_is_shown(store, app):
    store.set_guidelines(GUIDELINES)
    add_items(store)
    with client(app) as ann:
        page_login(ann, "ann")
        page = ann.get("/").text
        assert XSS_ESCAPED in page and XSS not in page and "<img" not in page and "alert(1)</script>" not in page
        # what a labeler typed, and a completion id in an error message, are text too
        form = {**hidden_fields(page, "label-form"), "action": "rank", "comment": XSS, "rank-c0": "1",
                "rank-c1": "2", "rank-c2": "2", "rank-<script>x()</script>": "3"}
        r = ann.post("/label", data=form)
        assert r.status_code == 400 and XSS_ESCAPED in r.text and "&lt;script&gt;x()&lt;/script&gt;" in r.text
        assert XSS not in r.text and "<script>x()" not in r.text
    assert render_markdown(XSS) == f"<p>{XSS_ESCAPED}</p>"


def test_guidelines_markdown_renders_only_its_small_subset():
    text = ("# Title <b>x</b>\n\nFirst **bold** and *em* and _em2_,\nsame paragraph with `a<b>*c*`.\n\n"
            "- one\n- two\n  continued\n\n1. first\n2) second\n\n[a link](javascript:alert(1)) "
            '<a href="x" onclick="y">z</a> 2 * 3 * 4\n### Small ###')
    assert render_markdown(text) == (
        "<h2>Title &lt;b&gt;x&lt;/b&gt;</h2>\n"
        "<p>First <strong>bold</strong> and <em>em</em> and <em>em2</em>, same paragraph with "
        "<code>a&lt;b&gt;*c*</code>.</p>\n"
        "<ul><li>one</li><li>two continued</li></ul>\n"
        "<ol><li>first</li><li>second</li></ol>\n"
        "<p>[a link](javascript:alert(1)) &lt;a href=&quot;x&quot; onclick=&quot;y&quot;&gt;z&lt;/a&gt; "
        "2 * 3 * 4</p>\n"
        "<h4>Small</h4>")
    assert render_markdown("") == ""


class _Inline(HTMLParser):
    """Everything in a page that would need 'unsafe-inline' or fetch from elsewhere."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self.in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.found += [f"{tag} {k}=" for k in a if k.startswith("on") or k == "style"]
        if tag == "style":
            self.found.append("<style>")
        if tag == "script":
            self.in_script = True
            if not (a.get("src") or "").startswith("/static/"):
                self.found.append(f"script src={a.get('src')}")
        for k in ("src", "href", "action"):
            if a.get(k) and re.match(r"(?!data:)[a-z]+:|//", a[k]):  # another origin (data: is none)
                self.found.append(f"{tag} {k}={a[k]}")

    def handle_endtag(self, tag):
        if tag == "script":
            self.in_script = False

    def handle_data(self, data):
        if self.in_script and data.strip():
            self.found.append("inline script")


def test_no_page_has_inline_script_style_or_handlers_or_outside_links(store, app):
    add_items(store, n=1)
    pages = {}
    with client(app) as ann, client(app) as root, client(app) as nobody:
        pages["login"] = nobody.get("/login")
        page_login(ann, "ann")
        pages["label"] = ann.get("/")
        pages["error"] = ann.get("/admin")
        pages["bad form"] = ann.post("/label", data={**hidden_fields(pages["label"].text, "label-form"),
                                                     "action": "unsafe"})
        root_csrf = login(root, "root")
        pages["admin"] = root.get("/admin")
        task = root.get("/api/next").json()
        root.post("/api/labels", json={"item_id": task["item_id"], "submission_id": "r", "special": "unsafe",
                                       "reason": "x"}, headers={"X-CSRF-Token": root_csrf})
        pages["nothing left"] = root.get("/")
    assert [p.status_code for p in pages.values()] == [200, 200, 403, 400, 200, 200]
    assert 'data-testid="nothing-left"' in pages["nothing left"].text
    for name, r in pages.items():
        parser = _Inline()
        parser.feed(r.text)
        assert parser.found == [], name


def test_the_script_builds_no_markup_from_data():
    js = (Path(__file__).parents[2] / "src/lmcycle/feedback/static/label.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "http:", "https:"):
        assert sink not in js, sink
    assert "textContent" in js


def test_security_headers_on_every_kind_of_response(store, app):
    add_items(store, n=1)
    with client(app) as ann, client(app) as nobody:
        csrf = login(ann, "ann")
        responses = {"login page": nobody.get("/login"), "redirect": nobody.get("/"), "401": nobody.get("/api/next"),
                     "page": ann.get("/"), "api": ann.get("/api/next"), "403": ann.get("/api/stats"),
                     "404": ann.get("/api/nowhere"), "400": ann.post("/api/labels", json={}, headers={
                         "X-CSRF-Token": csrf}), "static": nobody.get("/static/label.js")}
    for name, r in responses.items():
        assert r.headers["content-security-policy"] == CSP, name
        assert (r.headers["x-content-type-options"], r.headers["referrer-policy"], r.headers["x-frame-options"]) == (
            "nosniff", "no-referrer", "DENY"), name
        assert (r.headers.get("cache-control") == "no-store") == (name != "static"), name
    assert responses["404"].json() == {"error": "Not Found", "field": None}
    assert responses["static"].headers["content-type"].startswith("text/javascript")
    assert nobody.get("/static/label.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize("secure", [False, True])
def test_the_session_cookie_is_httponly_strict_and_secure_when_asked(store, users, clock, secure):
    app = create_app(store, clock=clock, secure_cookies=secure)
    with client(app) as c:
        r = c.post("/api/login", json={"name": "ann", "password": "ann-password"})
        cookie = r.headers["set-cookie"]
        attributes = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")[1:]}
        assert cookie.startswith("lmcycle_session=") and "httponly" in attributes
        assert attributes["samesite"].lower() == "samesite=strict" and attributes["path"] == "Path=/"
        assert attributes["max-age"] == "Max-Age=28800"
        assert ("secure" in attributes) == secure
        assert r.json() == {"csrf_token": r.json()["csrf_token"], "user": "ann", "role": "labeler"}
        assert len(r.json()["csrf_token"]) >= 32 and r.json()["csrf_token"] not in cookie
