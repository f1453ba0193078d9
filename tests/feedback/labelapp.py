"""What the labeling app's tests share: items with a hostile completion, guidelines with raw HTML in them,
logged-in test clients, and the hidden fields of a served form.

The store comes from conftest's ``store`` fixture (overlap 2, toxicity rated 0-1) and its accounts from
``users`` (ann, bob, cy; admin root; password ``<name>-password``).
"""

from __future__ import annotations

from html.parser import HTMLParser

from starlette.testclient import TestClient

from lmcycle.feedback.items import Completion, ItemSpec

XSS = "<script>alert(1)</script><img src=x onerror=alert(1)>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"
GUIDELINES = "# Rank by helpfulness\n\n**Best** first; *ties* allowed.\n\n<img src=x onerror=alert(1)>\n"


def add_items(store, n: int = 2, k: int = 3) -> list[int]:
    """``n`` items p1.. with completions c0..c{k-1}; p1's c0 is :data:`XSS`. Returns their item ids."""
    specs = [ItemSpec(f"p{i}", f"question {i}?", [Completion(f"c{j}", XSS if (i, j) == (1, 0) else f"answer {j} of {i}",
                                                            "tiny-sft") for j in range(k)]) for i in range(1, n + 1)]
    store.add_items(specs)
    return [item.id for item in store.snapshot().items]


def client(app, address: str = "testclient") -> TestClient:
    """A test client that keeps its cookies and does not follow redirects (tests look at them)."""
    return TestClient(app, follow_redirects=False, client=(address, 50000))


def login(c: TestClient, name: str, password: str | None = None) -> str:
    """Log ``c`` in through the API as ``name``; returns the CSRF token."""
    r = c.post("/api/login", json={"name": name, "password": password or f"{name}-password"})
    assert r.status_code == 200, r.text
    return r.json()["csrf_token"]


def page_login(c: TestClient, name: str) -> None:
    """Log ``c`` in through the login page (its double-submit token included)."""
    token = hidden_fields(c.get("/login").text, "login-form")["csrf_token"]
    r = c.post("/login", data={"name": name, "password": f"{name}-password", "csrf_token": token})
    assert r.status_code == 303, r.text


class _Forms(HTMLParser):
    def __init__(self):
        super().__init__()
        self.form: str | None = None
        self.fields: dict[str, dict[str, str]] = {}
        self.order: list[str] = []  # data-testid of completion cards, in page order

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.form = a.get("id")
            self.fields.setdefault(self.form, {})
        elif tag == "input" and self.form and a.get("type") == "hidden":
            self.fields[self.form][a["name"]] = a.get("value", "")
        elif tag == "article" and "card" in (a.get("class") or "").split():
            self.order.append(a["data-testid"].removeprefix("completion-"))

    def handle_endtag(self, tag):
        if tag == "form":
            self.form = None


def hidden_fields(html: str, form_id: str) -> dict[str, str]:
    """The hidden inputs of the form with id ``form_id`` in ``html``."""
    parser = _Forms()
    parser.feed(html)
    return parser.fields[form_id]


def card_order(html: str) -> list[str]:
    """The completion ids of the page's cards, in the order the page shows them."""
    parser = _Forms()
    parser.feed(html)
    return parser.order
