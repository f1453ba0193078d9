"""The labeling app in a real browser (Playwright driving Debian's Chromium): what a person sees and does, and
what the database holds afterwards.

The HTTP-level tests (test_web.py, test_web_security.py) check what the server sends; these check what only a
browser shows: that label.js ranks by keyboard and by drag and drop, that the CSP leaves the app's own script
running but nothing from the data, that hostile text is shown as text, that downloads arrive.

Chromium is ``/usr/bin/chromium`` (the Debian package; Playwright cannot download its own browser here). Without
it, or without the playwright package, the tests skip with the reason, unless ``LMCYCLE_TEST_BROWSER_REQUIRED=1``
(CI) makes that a failure. ``LMCYCLE_SCREENSHOTS=1`` also saves full-page screenshots to ``docs/screenshots/``
(off by default, so that a test run does not rewrite tracked files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from labelapp import GUIDELINES, add_items

from lmcycle.atomic import atomic_write_bytes
from lmcycle.data.preferences import load_rankings
from lmcycle.feedback.items import Completion, ItemSpec
from lmcycle.feedback.labels import Label
from lmcycle.feedback.simulate import serving
from lmcycle.feedback.web import create_app

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser fixture says so (skip, or fail under LMCYCLE_TEST_BROWSER_REQUIRED=1)
    expect = sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]  # root: no sandbox
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
SCRIPT = "<script>window.__pwned=1</script>"
IMG = '<img src=x onerror="window.__pwned=2">'
# Runs before each page's own script (Playwright injects it past the CSP): records what the CSP refused.
WATCH_CSP = ("window.__violations = []; document.addEventListener('securitypolicyviolation', function (e) {"
             " window.__violations.push(e.violatedDirective + ' ' + e.blockedURI); });")


def _skip_or_fail(why: str) -> None:
    if os.environ.get("LMCYCLE_TEST_BROWSER_REQUIRED") == "1":
        pytest.fail(why + " (LMCYCLE_TEST_BROWSER_REQUIRED=1)")
    pytest.skip(reason=why)


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module (a launch costs about a second); each test opens its own contexts."""
    if sync_playwright is None:
        _skip_or_fail("the playwright package is not installed (pip install playwright)")
    if not CHROMIUM.is_file():
        _skip_or_fail(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    except Exception as e:  # any failure to start it is the same skip (or failure) with its reason
        pw.stop()
        _skip_or_fail(f"{CHROMIUM} does not start under Playwright: {' '.join(str(e).split())[:300]}")
    yield b
    b.close()
    pw.stop()


@pytest.fixture
def url(store, users, clock):
    """The app over the test's store, served on a loopback port."""
    with serving(create_app(store, clock=clock)) as base:
        yield base


class Tab:
    """A page in a fresh browser context (its own cookies), with what went wrong in it: uncaught script
    errors, console errors, dialogs (an ``alert`` that ran) and the URLs it requested."""

    def __init__(self, browser, base: str, javascript: bool = True):
        self.context = browser.new_context(viewport={"width": 1100, "height": 800}, java_script_enabled=javascript)
        self.context.set_default_timeout(5000)  # a missing element fails in seconds, not Playwright's 30
        self.context.add_init_script(WATCH_CSP)
        self.page, self.base = self.context.new_page(), base
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []  # "<path of the resource>: <message>"
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.on("console", lambda m: self.console_errors.append(f"{urlsplit(m.location['url']).path}: {m.text}")
                     if m.type == "error" else None)
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def log_in(self, name: str) -> None:
        """Log in through the login form, as a person would."""
        self.page.goto(self.base + "/login")
        self.page.get_by_label("Name").fill(name)
        self.page.get_by_label("Password").fill(f"{name}-password")
        self.page.get_by_role("button", name="Log in").click()
        expect(self.page.get_by_test_id("whoami")).to_contain_text(name)

    def violations(self) -> list[str]:
        """What the CSP refused on the current page."""
        return self.page.evaluate("window.__violations")

    def assert_clean(self, *refused: str) -> None:
        """Nothing went wrong in the page: no script error, console error, dialog or CSP refusal. The browser's
        console note that a resource failed is not an error for the paths in ``refused`` (the test asked)."""
        errors = [m for m in self.console_errors
                  if not (m.split(": ")[0] in refused and ": Failed to load resource: " in m)]
        assert (self.page_errors, errors, self.dialogs) == ([], [], [])
        assert self.violations() == []

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tabs(browser, url):
    """``tabs(javascript=True)``: a new :class:`Tab` on the app; all are closed after the test."""
    opened = []

    def new(javascript: bool = True) -> Tab:
        opened.append(Tab(browser, url, javascript))
        return opened[-1]

    yield new
    for tab in opened:
        tab.close()


def _screenshot(page, name: str) -> None:
    if os.environ.get("LMCYCLE_SCREENSHOTS") == "1":
        atomic_write_bytes(SCREENSHOTS / name, page.screenshot(full_page=True))


def _card_ids(page, where: str = "#label-form") -> list[str]:
    """The completion ids of the cards in a part of the page, in the order shown."""
    return page.locator(f"{where} .card").evaluate_all("cards => cards.map(c => c.dataset.completionId)")


def _items(store, *ks: int) -> list[int]:
    """One item per k (prompts q1.., completions c0.. with distinct texts); returns their ids."""
    store.add_items([ItemSpec(f"q{i}", f"Which answer to question {i} is best?",
                              [Completion(f"c{j}", f"Answer {j} to question {i}: " + "it depends. " * (j + 1),
                                          "tiny-sft") for j in range(k)]) for i, k in enumerate(ks, 1)])
    return [item.id for item in store.snapshot().items]


def test_a_labeler_ranks_by_keyboard_and_by_drag_with_ties_undoes_and_ranks_again(store, tabs, clock):
    first, second = _items(store, 4, 3)
    store.set_guidelines(GUIDELINES)
    tab = tabs()
    page = tab.page
    tab.log_in("ann")
    assert page.url == tab.base + "/"
    progress = page.get_by_test_id("progress")
    expect(progress).to_have_text("done 0 / left 2")
    page.locator("#guidelines summary").click()  # folded while there is an item to label
    expect(page.locator("#guidelines h2")).to_have_text("Rank by helpfulness")
    expect(page.locator("#guidelines strong")).to_have_text("Best")
    expect(page.locator("#guidelines")).to_contain_text("<img src=x onerror=alert(1)>")  # raw HTML: as text
    expect(page.get_by_test_id("guideline-version")).to_have_text("2")
    expect(page.get_by_test_id("prompt")).to_have_text("Which answer to question 1 is best?")

    # keyboard: 1, then → 2, → 2 (a tie), → ↑ (unranked to the last rank, 4) ↑ (3)
    a, b, c, d = shown = _card_ids(page)
    assert shown == [x.id for x in store.next_item_for("ann").completions]  # the store's shuffle for ann
    page.locator("#card-1").focus()
    for key in ("1", "ArrowRight", "2", "ArrowRight", "2", "ArrowRight"):
        page.keyboard.press(key)
    assert page.evaluate("document.activeElement.dataset.completionId") == d  # focus followed the moves
    assert (_card_ids(page, "#rank-group-1"), _card_ids(page, "#rank-group-2"), _card_ids(page, "#unranked")) == (
        [a], [b, c], [d])
    page.get_by_test_id(f"rating-{a}").fill("0.25")
    _screenshot(page, "labeling.png")
    page.get_by_test_id("submit").click()  # d is not ranked yet: refused in the page
    expect(page.get_by_test_id("form-message")).to_have_text(
        "Rank every completion (1 not ranked yet); ties are allowed.")
    assert page.evaluate("document.activeElement.dataset.completionId") == d
    assert store.labels_of("ann") == []
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    assert _card_ids(page, "#rank-group-3") == [d] and _card_ids(page, "#rank-group-4") == []
    expect(page.get_by_test_id("form-message")).to_be_hidden()
    assert [page.get_by_test_id(f"rank-{x}").input_value() for x in shown] == ["1", "2", "2", "3"]
    clock.advance(20)
    page.get_by_test_id("submit").click()
    expect(page.get_by_test_id("notice")).to_have_text("Saved. Here is your next item.")
    expect(progress).to_have_text("done 1 / left 1")
    (kept,) = store.labels_of("ann")
    assert (kept.item_id, kept.ranking, kept.ratings, kept.special, kept.seconds) == (
        first, [[a], [b, c], [d]], {a: 0.25}, None, 20)

    # drag and drop: the second item, 3 completions, the last two tied
    assert page.locator("#item-id").input_value() == str(second)
    x, y, z = _card_ids(page)
    page.get_by_test_id(f"completion-{y}").drag_to(page.get_by_test_id("rank-group-1"))
    page.get_by_test_id(f"completion-{x}").drag_to(page.get_by_test_id("rank-group-1"))
    page.get_by_test_id(f"completion-{y}").drag_to(page.get_by_test_id("rank-group-2"))  # moved on: 1 → 2
    page.get_by_test_id(f"completion-{z}").drag_to(page.get_by_test_id("rank-group-2"))
    assert (_card_ids(page, "#rank-group-1"), _card_ids(page, "#rank-group-2"), _card_ids(page, "#unranked")) == (
        [x], [y, z], [])
    assert [page.get_by_test_id(f"rank-{i}").input_value() for i in (x, y, z)] == ["1", "2", "2"]
    page.get_by_test_id("submit").click()
    expect(page.get_by_test_id("nothing-left")).to_be_visible()
    expect(progress).to_have_text("done 2 / left 0")
    dragged = store.labels_of("ann")[-1]
    assert (dragged.item_id, dragged.ranking) == (second, [[x], [y, z]])

    # undo: the second item comes back, its label kept but marked undone
    page.get_by_test_id("undo").click()
    expect(page.get_by_test_id("notice")).to_have_text("Your last submission was undone: it is shown again.")
    expect(progress).to_have_text("done 1 / left 1")
    assert page.locator("#item-id").input_value() == str(second) and _card_ids(page, "#unranked") == [x, y, z]
    assert [lab.id for lab in store.labels_of("ann")] == [kept.id]
    assert store.label("ann", dragged.id).undone_at is not None

    # again, typing each rank in its box: leaving the box moves the card into its group
    for cid, rank in ((z, "1"), (x, "2"), (y, "2")):
        page.get_by_test_id(f"rank-{cid}").click()
        page.keyboard.type(rank)
        page.keyboard.press("Tab")
    assert (_card_ids(page, "#rank-group-1"), _card_ids(page, "#rank-group-2")) == ([z], [x, y])
    page.get_by_test_id("submit").click()
    expect(progress).to_have_text("done 2 / left 0")
    again = store.labels_of("ann")[-1]
    assert (again.item_id, again.ranking) == (second, [[z], [x, y]]) and again.id != dragged.id
    tab.assert_clean()


def test_unsafe_needs_a_reason_in_the_page_and_on_the_server(store, tabs):
    (item,) = add_items(store, n=1)
    tab = tabs()
    page = tab.page
    tab.log_in("ann")
    for button in ("unsafe", "not-rankable"):
        page.get_by_test_id(button).click()
        expect(page.get_by_test_id("form-message")).to_have_text("Say why in the Reason box first.")
        assert page.evaluate("document.activeElement.id") == "reason" and page.url == tab.base + "/"
    assert store.labels_of("ann") == []

    # without the script the server refuses it, and keeps what was typed
    plain = tabs(javascript=False)
    plain.log_in("bob")
    plain.page.get_by_test_id("comment").fill("looks harmful")
    plain.page.get_by_test_id("unsafe").click()
    expect(plain.page.get_by_test_id("error")).to_have_text("field 'reason': a 'unsafe' label needs a reason")
    expect(plain.page.get_by_test_id("comment")).to_have_value("looks harmful")
    assert store.labels_of("bob") == []

    page.get_by_test_id("reason").fill("gives dangerous instructions")
    page.get_by_test_id("unsafe").click()
    expect(page.get_by_test_id("notice")).to_have_text("Saved. Here is your next item.")
    expect(page.get_by_test_id("progress")).to_have_text("done 1 / left 0")
    (label,) = store.labels_of("ann")
    assert (label.item_id, label.special, label.reason, label.ranking) == (
        item, "unsafe", "gives dangerous instructions", None)
    tab.assert_clean()
    plain.assert_clean("/label")  # the 400


def test_hostile_completions_show_as_text_and_run_nothing(store, tabs):
    store.add_items([ItemSpec("evil", f"Summarise {IMG} please", [Completion("s", SCRIPT, "m"),
                                                                     Completion("i", IMG, "m"),
                                                                     Completion("ok", "A plain answer.", "m")])])
    store.set_guidelines(GUIDELINES)
    tab = tabs()
    page = tab.page
    tab.log_in("ann")
    expect(page.get_by_test_id("completion-text-s")).to_have_text(SCRIPT)  # the visible text holds <script>
    expect(page.get_by_test_id("completion-text-i")).to_have_text(IMG)
    expect(page.get_by_test_id("prompt")).to_have_text(f"Summarise {IMG} please")
    assert "<script>" in page.locator("#label-form").inner_text()
    page.locator("#guidelines summary").click()
    expect(page.locator("#guidelines")).to_contain_text("<img src=x onerror=alert(1)>")
    # the text became text nodes: no element was made from it, and nothing loaded or ran
    assert page.locator("main script, main img, main iframe").count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert not [u for u in tab.requests if u.rstrip("/").endswith("/x")]
    assert page.evaluate("document.documentElement.classList.contains('js')")  # while the app's own script ran
    _screenshot(page, "escaped.png")
    tab.assert_clean()

    page.locator("#card-1").focus()
    for key in ("1", "ArrowRight", "2", "ArrowRight", "3"):
        page.keyboard.press(key)
    page.get_by_test_id("submit").click()
    expect(page.get_by_test_id("nothing-left")).to_be_visible()
    (label,) = store.labels_of("ann")
    shown = [c.id for c in store.snapshot().items[0].completions]
    assert sorted(cid for group in label.ranking for cid in group) == sorted(shown)
    assert [c.text for c in store.snapshot().items[0].completions] == [SCRIPT, IMG, "A plain answer."]
    assert page.evaluate("typeof window.__pwned") == "undefined"
    tab.assert_clean()

    # the watchers do see an injected handler: the CSP refuses it and says so (it would catch a regression)
    page.evaluate("document.body.insertAdjacentHTML('beforeend', '<img src=x onerror=\"window.__pwned=3\">')")
    page.wait_for_function("() => window.__violations.length > 0")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert [v.split()[0] for v in tab.violations()] == ["script-src-attr"]
    assert any("Content Security Policy" in m for m in tab.console_errors)


def test_a_labeler_cannot_open_anothers_label_or_the_admin_page(store, tabs):
    (item, _) = add_items(store)
    for name in ("ann", "bob"):
        assert store.next_item_for(name).item_id == item
        store.submit(name, item, Label(ranking=[["c0"], ["c1", "c2"]]), f"{name}-1")
    ann_label, bob_label = store.labels_of("ann")[0], store.labels_of("bob")[0]
    tab = tabs()
    page = tab.page
    tab.log_in("bob")
    r = page.goto(f"{tab.base}/api/labels/{ann_label.id}")
    assert r.status == 403 and r.json() == {"error": f"label {ann_label.id} is not 'bob''s", "field": "label_id"}
    page.goto(tab.base + "/")
    fetch = "id => fetch('/api/labels/' + id).then(async r => [r.status, (await r.json()).labeler || null])"
    assert page.evaluate(fetch, ann_label.id) == [403, None]
    assert page.evaluate(fetch, bob_label.id) == [200, "bob"]  # their own opens
    listed = page.evaluate("fetch('/api/labels').then(r => r.json())")
    assert [lab["id"] for lab in listed] == [bob_label.id]
    r = page.goto(tab.base + "/admin")
    assert r.status == 403
    expect(page.get_by_test_id("error")).to_have_text("admins only")
    expect(page.locator("h1")).to_have_text("Error 403")
    assert page.locator("#overall").count() == 0
    assert store.labels_of("ann") == [ann_label]  # untouched
    # the JSON view asks for /favicon.ico, which the app has not (the pages say theirs is empty)
    tab.assert_clean(f"/api/labels/{ann_label.id}", "/admin", "/favicon.ico")


def test_an_admin_sees_the_stats_and_downloads_the_export(store, tabs, clock, tmp_path):
    items = add_items(store, n=3)
    ann = tabs()
    ann.log_in("ann")
    # ann ranks her two items in the page: in the order shown, then all three tied
    in_order, all_tied = ("1", "ArrowRight", "2", "ArrowRight", "3"), ("1", "ArrowRight", "1", "ArrowRight", "1")
    for done, keys in enumerate((in_order, all_tied), 1):
        shown = _card_ids(ann.page)
        ann.page.locator("#card-1").focus()
        for key in keys:
            ann.page.keyboard.press(key)
        clock.advance(15)
        ann.page.get_by_test_id("submit").click()
        expect(ann.page.get_by_test_id("progress")).to_have_text(f"done {done} / left {3 - done}")
        if done == 1:
            assert store.labels_of("ann")[0].ranking == [[cid] for cid in shown]
    ann.assert_clean()
    agrees = store.labels_of("ann")[0].ranking  # bob agrees with ann on the first item, not on the second
    for name, ranking in (("bob", agrees), ("bob", [["c0", "c1"], ["c2"]]), ("cy", None)):
        task = store.next_item_for(name)
        clock.advance(8)
        label = Label(ranking=ranking) if ranking else Label(special="not_rankable", reason="all the same")
        store.submit(name, task.item_id, label, f"{name}-{task.item_id}")
    made = store.snapshot().labels
    assert [(lab.labeler, lab.item_id) for lab in made] == [
        ("ann", items[0]), ("ann", items[1]), ("bob", items[0]), ("bob", items[1]), ("cy", items[2])]

    admin = tabs()
    page = admin.page
    admin.log_in("root")
    assert page.url == admin.base + "/admin"
    expect(page.locator("#overall-done")).to_have_text("5")
    expect(page.locator("#overall-left")).to_have_text("1")  # the third item's second labeler
    expect(page.get_by_test_id("labeler-ann").locator("td").nth(1)).to_have_text("2")
    expect(page.get_by_test_id("labeler-cy")).to_contain_text("not_rankable 1")
    expect(page.get_by_test_id("agreement-summary")).to_contain_text("overall agreed")
    plot = page.get_by_test_id("agreement-plot")
    plot.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=plot.element_handle())  # it shows
    _screenshot(page, "admin.png")
    fetch = "id => fetch('/api/labels/' + id).then(r => r.status)"
    assert page.evaluate(fetch, made[0].id) == 200  # an admin may open anyone's label

    with page.expect_download() as info:
        page.get_by_test_id("export-rankings").click()
    download = info.value
    assert download.suggested_filename == "default-rankings.jsonl"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    rows = [json.loads(line) for line in saved.read_text(encoding="utf-8").splitlines()]
    completions = {item.prompt_id: [c.id for c in item.completions] for item in store.snapshot().items}
    expected = []
    for lab in sorted(made, key=lambda lab: (items.index(lab.item_id), lab.labeler)):  # the export's order
        ids = completions[lab.prompt_id]
        ranks = None if lab.ranking is None else [next(r for r, g in enumerate(lab.ranking, 1) if cid in g)
                                                  for cid in ids]
        expected.append((lab.labeler, lab.prompt_id, ranks, lab.special))
    assert [(r["labeler"], r["prompt_id"], r["ranks"], r["special"]) for r in rows] == expected
    assert (rows[2]["ranks"], rows[3]["ranks"], rows[4]["reason"]) == ([1, 1, 1], [1, 1, 2], "all the same")
    # what a reward-model recipe reads (data: {format: rankings}) takes the file as it came
    assert [(r.labeler, r.prompt_id, r.ranks) for r in load_rankings(saved)] == [
        (labeler, prompt_id, ranks or [None] * 3) for labeler, prompt_id, ranks, _ in expected]

    with page.expect_download() as info:
        page.get_by_test_id("export-jsonl").click()
    stored = [json.loads(line) for line in Path(info.value.path()).read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["ranking"]) for r in stored] == [(lab.id, lab.ranking) for lab in made]
    admin.assert_clean()
