"""The labeling app: server-rendered pages where people rank completions, and a JSON API that does the same for
scripts (simulated labelers, load tests), over a :class:`~lmcycle.feedback.store.LabelStore`.

Pages: ``/login``, ``/`` (the labeler's current item: guidelines, prompt, completions in the store's shuffled
order, a ranking board with drag and drop and a keyboard path, "Not rankable" / "Unsafe" with a reason,
per-completion ratings when the project has a scale, a comment, progress, undo), ``/admin`` (stats, export,
agreement, ``/admin/agreement.png``) and ``/admin/export``. API (JSON; errors are ``{"error", "field"}``):
``POST /api/login``, ``GET /api/next``, ``POST /api/labels``, ``POST /api/undo``, ``GET /api/labels[/{id}]``,
``GET /api/guidelines``, and for admins ``GET /api/stats``, ``GET /api/export``. Store errors map to status
codes: ``NotFound`` 404, ``Forbidden`` 403, ``Conflict`` 409, any other ``LmcycleError`` 400.

Security (its pieces are in :mod:`lmcycle.feedback.guards`):

- **Sessions** live in the database (:meth:`LabelStore.open_session`): the cookie ``lmcycle_session``
  (HttpOnly, SameSite=Strict, Path=/, Secure with ``secure_cookies``) holds a random token whose SHA-256 is
  stored; each session has its own CSRF token and expires ``session_ttl_s`` after login, on ``clock``.
- **CSRF**: every POST except the two logins needs the session's token, in the ``X-CSRF-Token`` header (API)
  or the ``csrf_token`` form field (pages). The page login is guarded by a double-submit token: a random value
  in a cookie of its own and in the form, which must match (a cross-site form cannot read or set the cookie).
  JSON bodies must say ``Content-Type: application/json``, which no cross-site form can send.
- **Login throttling**: after ``login_limit = (n, window_s)`` failures for one (client address, name) within
  the window, 429 with ``Retry-After`` until the oldest failure leaves the window. Behind a reverse proxy every
  client has the proxy's address, so the limit is then per name.
- **Output**: Jinja2 autoescaping on every template; completions, prompts, labels and comments are only ever
  text nodes; guidelines Markdown is escaped before its subset is rendered
  (:mod:`lmcycle.feedback.safe_markdown`). The CSP allows scripts and styles from this origin only, and the
  pages have no inline script, style or event handler.
- **Bodies** over 1 MiB are refused (413) before they are parsed.

Endpoints are plain ``def``: FastAPI runs them in its worker threads, and the store gives each thread its own
database connection.
"""

import math
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from lmcycle.errors import LmcycleError
from lmcycle.feedback.export import write_export
from lmcycle.feedback.guards import ApiError, Form, JsonBody, LoginLimiter, SecurityHeaders, same_token
from lmcycle.feedback.labels import Label
from lmcycle.feedback.safe_markdown import render_markdown
from lmcycle.feedback.stats import project_stats
from lmcycle.feedback.store import Conflict, Forbidden, LabelStore, NotFound, Session, StoredLabel

SESSION_COOKIE = "lmcycle_session"
LOGIN_COOKIE = "lmcycle_login_csrf"
CSRF_HEADER = "X-CSRF-Token"
MAX_PASSWORD = 1024  # longer is refused before argon2 spends time on it
WEB_EXPORT_FORMATS = ("rankings", "jsonl")  # one file each (the CLI may write more)
NOTICES = {"saved": "Saved. Here is your next item.", "undone": "Your last submission was undone: it is shown again.",
           "nothing-to-undo": "There was nothing to undo."}  # the only texts a URL can put on the page
HERE = Path(__file__).parent
TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                               undefined=jinja2.StrictUndefined)


class _ToLogin(Exception):
    """A page was asked for without a live session."""


def status_of(error: LmcycleError) -> int:
    """The HTTP status of a store error."""
    for cls, status in ((NotFound, 404), (Forbidden, 403), (Conflict, 409)):
        if isinstance(error, cls):
            return status
    return 400


@dataclass(frozen=True)
class _App:
    store: LabelStore
    project: str
    session_ttl_s: float
    limiter: LoginLimiter
    secure_cookies: bool
    clock: Callable[[], float]


def label_json(label: StoredLabel) -> dict[str, Any]:
    """A stored label as the API returns it (every stored field)."""
    return asdict(label)


def label_from_form(form: dict[str, str]) -> Label:
    """The label a labeling page's form describes: ``action`` rank | not_rankable | unsafe; ``rank-<id>`` the
    rank of each completion (equal numbers tie; a gap between numbers changes nothing); ``rating-<id>``
    optional ratings; ``reason``, ``comment``."""
    ratings = {}
    for key, value in form.items():
        if key.startswith("rating-") and value.strip():
            cid = key.removeprefix("rating-")
            try:
                ratings[cid] = float(value)
            except ValueError:
                raise LmcycleError(f"not a number: {value!r:.40}", field=f"ratings.{cid}") from None
            if not math.isfinite(ratings[cid]):
                raise LmcycleError(f"not a finite number: {value!r:.40}", field=f"ratings.{cid}")
    action, comment = form.get("action", "rank"), form.get("comment", "")
    if action in ("not_rankable", "unsafe"):
        return Label(special=action, reason=form.get("reason", ""), ratings=ratings, comment=comment)
    if action != "rank":
        raise LmcycleError(f"unknown action {action!r:.40} (rank, not_rankable, unsafe)", field="action")
    ranks = {}
    for key, value in form.items():
        if key.startswith("rank-") and value.strip():
            try:
                ranks[key.removeprefix("rank-")] = int(value)
            except ValueError:
                raise LmcycleError(f"a rank is a whole number, got {value!r:.40}", field="ranking") from None
    groups = [[cid for cid, r in ranks.items() if r == rank] for rank in sorted(set(ranks.values()))]
    return Label(ranking=groups, ratings=ratings, comment=comment)


def agreement_figures(snap: Any) -> dict[str, Any] | None:
    """The agreement report of the project's labels (:mod:`lmcycle.feedback.agreement`), or None where that
    module is not there. The admin page's agreement glue is this, :func:`agreement_png` and
    :func:`agreement_view`."""
    try:
        from lmcycle.feedback.agreement import agreement_report  # lazy: optional, and it loads krippendorff
        from lmcycle.feedback.export import rankings_from_snapshot
    except ImportError:
        return None
    rankings, gold = rankings_from_snapshot(snap)
    try:
        return agreement_report(rankings, gold)
    except LmcycleError as e:  # e.g. krippendorff missing: the admin page says so rather than failing whole
        return {"error": e.render()}


def agreement_png(report: dict[str, Any]) -> bytes | None:
    """:func:`lmcycle.feedback.agreement.agreement_plot` of the report as PNG bytes, or None without it."""
    try:
        from lmcycle.feedback.agreement import agreement_plot  # lazy: optional, and it loads matplotlib
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(agreement_plot(report, Path(tmp) / "agreement.png")).read_bytes()


def agreement_view(report: dict[str, Any]) -> dict[str, Any]:
    """What the admin page shows of an agreement report: ``summary`` (the scalar figures of its ``alpha`` and
    ``overall`` parts, as (name, value)), and ``columns`` / ``rows``, its per-labeler table (scalars only)."""
    summary = [(f"{part} {key}", value) for part in ("alpha", "overall")
               for key, value in (report.get(part) or {}).items() if _scalar(value)]
    labelers = report.get("labelers") or []
    if isinstance(labelers, dict):
        labelers = [{"labeler": name, **row} for name, row in labelers.items()]
    columns: list[str] = []
    for row in labelers:
        columns += [k for k, v in row.items() if k not in columns and _scalar(v)]
    return {"summary": summary, "columns": columns, "rows": [[row.get(c) for c in columns] for row in labelers],
            "error": report.get("error")}


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float)


def _page(template: str, status_code: int = 200, /, **context: Any) -> HTMLResponse:
    context.setdefault("user", None)
    context.setdefault("csrf_token", "")
    return HTMLResponse(TEMPLATES.get_template(template).render(**context), status_code=status_code)


def _error_response(request: Request, status: int, message: str, field: str | None,
                    headers: dict | None = None) -> Response:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)
    response = _page("error.html", status, code=status, message=message, field=field)
    response.headers.update(headers or {})
    return response


def create_app(store: LabelStore, *, project: str = "default", session_ttl_s: float = 8 * 3600,
               login_limit: tuple[int, float] = (5, 60.0), secure_cookies: bool = False,
               clock: Callable[[], float] = time.time) -> FastAPI:
    """The labeling app over ``store`` for one project (it must exist). ``login_limit``: ``(failures,
    window_s)`` per client address and name; ``secure_cookies``: mark cookies Secure (serve over HTTPS);
    ``clock``: what session expiry and login throttling are measured on."""
    attempts, window_s = login_limit
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1 or not window_s > 0:
        raise LmcycleError(f"login_limit is (failures >= 1, window seconds > 0), got {login_limit!r}",
                           field="login_limit")
    if not session_ttl_s > 0:
        raise LmcycleError(f"session_ttl_s must be > 0, got {session_ttl_s}", field="session_ttl_s")
    store.project(project)  # a NotFound now, rather than on every page
    ctx = _App(store, project, float(session_ttl_s), LoginLimiter(attempts, float(window_s), clock),
               secure_cookies, clock)
    app = FastAPI(title="lmcycle labeling", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(ApiError)
    def _api_error(request: Request, e: ApiError):
        return _error_response(request, e.status, e.message, e.field, e.headers)

    @app.exception_handler(LmcycleError)
    def _store_error(request: Request, e: LmcycleError):
        return _error_response(request, status_of(e), e.message, e.field)

    @app.exception_handler(RequestValidationError)
    def _bad_request(request: Request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        return _error_response(request, 400, first.get("msg", "bad request"), str((first.get("loc") or ["?"])[-1]))

    def _http_error(request: Request, e: Exception):  # the router's and the static files' 404 and 405
        return _error_response(request, e.status_code, str(e.detail), None, dict(e.headers or {}))

    for status in (404, 405):
        app.add_exception_handler(status, _http_error)

    @app.exception_handler(_ToLogin)
    def _to_login(request: Request, e: _ToLogin):
        return RedirectResponse("/login", status_code=303)

    _add_api(app, ctx)
    _add_pages(app, ctx)
    return app


# -- sessions and logins ---------------------------------------------------------------------------------------


def _session(ctx: _App, request: Request) -> Session | None:
    token = request.cookies.get(SESSION_COOKIE, "")
    if not token or len(token) > 256:
        return None
    return ctx.store.session(token, ctx.clock())


def _login(ctx: _App, request: Request, name: str, password: str) -> tuple[str, Session]:
    """Check a name and password under the login limit and open a session: ``(token, session)``, or ApiError
    401 / 429."""
    key = (request.client.host if request.client else "", name[:100])
    wait = ctx.limiter.retry_after(key)
    if wait is not None:
        raise ApiError(429, f"too many failed logins: try again in {math.ceil(wait)} s", field="name",
                       headers={"Retry-After": str(max(1, math.ceil(wait)))})
    user = ctx.store.verify_password(name, password) if len(password) <= MAX_PASSWORD else None
    if user is None:
        ctx.limiter.failed(key)
        raise ApiError(401, "wrong name or password", field=None)
    ctx.limiter.succeeded(key)
    old = request.cookies.get(SESSION_COOKIE)
    if old:
        ctx.store.close_session(old)  # a login replaces the session this browser had
    return ctx.store.open_session(user.name, ctx.session_ttl_s, ctx.clock())


def _set_session_cookie(ctx: _App, response: Response, token: str) -> None:
    response.set_cookie(SESSION_COOKIE, token, max_age=int(ctx.session_ttl_s), path="/", httponly=True,
                        samesite="strict", secure=ctx.secure_cookies)


def _clear_session_cookie(ctx: _App, response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=ctx.secure_cookies)


# -- the JSON API ------------------------------------------------------------------------------------------------


def _add_api(app: FastAPI, ctx: _App) -> None:
    store, project = ctx.store, ctx.project

    def user(request: Request) -> Session:
        s = _session(ctx, request)
        if s is None:
            raise ApiError(401, "not logged in, or the session expired: POST /api/login")
        return s

    LoggedIn = Annotated[Session, Depends(user)]

    def writer(request: Request, s: LoggedIn) -> Session:
        if not same_token(request.headers.get(CSRF_HEADER, ""), s.csrf_token):
            raise ApiError(403, f"missing or wrong {CSRF_HEADER} header (the csrf_token /api/login returned)",
                           field=CSRF_HEADER)
        return s

    def admin(s: LoggedIn) -> Session:
        if s.user.role != "admin":
            raise ApiError(403, "admins only")
        return s

    Writer, Admin = Annotated[Session, Depends(writer)], Annotated[Session, Depends(admin)]

    @app.post("/api/login")
    def api_login(request: Request, body: JsonBody):
        for key in ("name", "password"):
            if not isinstance(body, dict) or not isinstance(body.get(key), str):
                raise ApiError(400, 'expected {"name": "...", "password": "..."}', field=key)
        token, s = _login(ctx, request, body["name"], body["password"])
        response = JSONResponse({"csrf_token": s.csrf_token, "user": s.user.name, "role": s.user.role})
        _set_session_cookie(ctx, response, token)
        return response

    @app.get("/api/next")
    def api_next(s: LoggedIn):
        task = store.next_item_for(s.user.name, project)
        if task is None:
            return Response(status_code=204)
        scale = store.project(project).rating_scale
        done, left = store.progress(s.user.name, project)
        return {"item_id": task.item_id, "prompt_id": task.prompt_id, "prompt": task.prompt,
                "completions": [{"id": c.id, "text": c.text} for c in task.completions],
                "guideline_version": task.guideline_version,
                "rating_scale": None if scale is None else {"name": scale.name, "min": scale.min, "max": scale.max},
                "progress": {"done": done, "left": left}}

    @app.post("/api/labels")
    def api_submit(s: Writer, body: JsonBody):
        if not isinstance(body, dict):
            raise ApiError(400, "a label is a JSON object", field="body")
        fields = dict(body)
        item_id, submission_id = fields.pop("item_id", None), fields.pop("submission_id", None)
        label = Label.from_dict(fields)
        stored, replayed = store.submit_or_replay(s.user.name, item_id, label, submission_id)
        return JSONResponse(label_json(stored), status_code=200 if replayed else 201)

    @app.post("/api/undo")
    def api_undo(s: Writer):
        undone = store.undo_last(s.user.name, project)
        if undone is None:
            raise ApiError(404, "nothing to undo")
        return label_json(undone)

    @app.get("/api/labels")
    def api_labels(s: LoggedIn):
        return [label_json(lab) for lab in store.labels_of(s.user.name, project)]

    @app.get("/api/labels/{label_id}")
    def api_label(label_id: int, s: LoggedIn):
        return label_json(store.label(s.user.name, label_id))

    @app.get("/api/guidelines")
    def api_guidelines(s: LoggedIn):
        g = store.guidelines(project)
        return {"version": g.version, "text": g.text}

    @app.get("/api/stats")
    def api_stats(s: Admin):
        snap = store.snapshot(project)
        return {**project_stats(snap), "agreement": agreement_figures(snap)}

    @app.get("/api/export")
    def api_export(s: Admin, format: str = "rankings"):
        return _export(ctx, format)


def _export(ctx: _App, format: str) -> Response:
    """The project's labels as a JSON Lines download, written by :func:`write_export` itself."""
    if format not in WEB_EXPORT_FORMATS:
        raise ApiError(400, f"unknown export format {format!r:.40} (known: {', '.join(WEB_EXPORT_FORMATS)})",
                       field="format")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.jsonl"
        write_export(ctx.store.snapshot(ctx.project), path, format)
        data = path.read_bytes()
    return Response(data, media_type="application/x-ndjson",  # project names are [A-Za-z0-9_.@-]: safe here
                    headers={"Content-Disposition": f'attachment; filename="{ctx.project}-{format}.jsonl"'})


# -- the pages ---------------------------------------------------------------------------------------------------


def _add_pages(app: FastAPI, ctx: _App) -> None:
    store, project = ctx.store, ctx.project

    def user(request: Request) -> Session:
        s = _session(ctx, request)
        if s is None:
            raise _ToLogin()
        return s

    LoggedIn = Annotated[Session, Depends(user)]

    def writer(s: LoggedIn, form: Form) -> tuple[Session, dict]:
        if not same_token(form.get("csrf_token", ""), s.csrf_token):
            raise ApiError(403, "this form is stale (missing or wrong csrf_token): reload the page and try again",
                           field="csrf_token")
        return s, form

    def admin(s: LoggedIn) -> Session:
        if s.user.role != "admin":
            raise ApiError(403, "admins only")
        return s

    Writer, Admin = Annotated[tuple, Depends(writer)], Annotated[Session, Depends(admin)]

    def login_form(status: int = 200, error: str | None = None, name: str = "",
                   headers: dict | None = None) -> Response:
        token = secrets.token_urlsafe(32)
        response = _page("login.html", status, login_token=token, error=error, name=name)
        response.headers.update(headers or {})
        response.set_cookie(LOGIN_COOKIE, token, max_age=3600, path="/login", httponly=True, samesite="strict",
                            secure=ctx.secure_cookies)
        return response

    def label_page(s: Session, status: int = 200, error: str | None = None, notice: str | None = None,
                   entered: dict | None = None, submission_id: str | None = None) -> Response:
        task = store.next_item_for(s.user.name, project)
        done, left = store.progress(s.user.name, project)
        guidelines = store.guidelines(project)
        if task is None or (entered or {}).get("item_id") != str(task.item_id):
            entered = {}  # what was typed belongs to another item
        return _page("label.html", status, user=s.user, csrf_token=s.csrf_token, task=task, done=done, left=left,
                     k=len(task.completions) if task else 0, scale=store.project(project).rating_scale,
                     guidelines_html=render_markdown(guidelines.text), guideline_version=guidelines.version,
                     submission_id=submission_id or secrets.token_urlsafe(18), error=error, notice=notice,
                     entered=entered)

    @app.get("/login")
    def login_page(request: Request):
        if _session(ctx, request) is not None:
            return RedirectResponse("/", status_code=303)
        return login_form()

    @app.post("/login")
    def login_submit(request: Request, form: Form):
        name, password = form.get("name", ""), form.get("password", "")
        if not same_token(form.get("csrf_token", ""), request.cookies.get(LOGIN_COOKIE, "")):
            return login_form(403, "the login form had expired: please log in again", name)
        try:
            token, s = _login(ctx, request, name, password)
        except ApiError as e:
            return login_form(e.status, e.message, name, e.headers)
        response = RedirectResponse("/admin" if s.user.role == "admin" else "/", status_code=303)
        _set_session_cookie(ctx, response, token)
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    @app.post("/logout")
    def logout(request: Request, w: Writer):
        store.close_session(request.cookies.get(SESSION_COOKIE, ""))
        response = RedirectResponse("/login", status_code=303)
        _clear_session_cookie(ctx, response)
        return response

    @app.get("/")
    def home(s: LoggedIn, notice: str = ""):
        return label_page(s, notice=NOTICES.get(notice))

    @app.post("/label")
    def submit(w: Writer):
        s, form = w
        raw_id = form.get("item_id", "")
        item_id: Any = int(raw_id) if raw_id.isdigit() else raw_id  # anything else is an unknown item
        try:
            store.submit(s.user.name, item_id, label_from_form(form), form.get("submission_id", ""))
        except LmcycleError as e:
            return label_page(s, status_of(e), error=e.render(), entered=form,
                              submission_id=form.get("submission_id") or None)
        return RedirectResponse("/?notice=saved", status_code=303)

    @app.post("/undo")
    def undo(w: Writer):
        undone = store.undo_last(w[0].user.name, project)
        return RedirectResponse(f"/?notice={'undone' if undone else 'nothing-to-undo'}", status_code=303)

    @app.get("/admin")
    def admin_page(s: Admin):
        snap = store.snapshot(project)
        report = agreement_figures(snap)
        return _page("admin.html", user=s.user, csrf_token=s.csrf_token, stats=project_stats(snap),
                     agreement=None if report is None else agreement_view(report), formats=WEB_EXPORT_FORMATS,
                     project=project)

    @app.get("/admin/agreement.png")
    def admin_agreement_plot(s: Admin):
        report = agreement_figures(store.snapshot(project))
        png = None if report is None or "error" in report else agreement_png(report)
        if png is None:
            raise ApiError(404, "no agreement plot: lmcycle.feedback.agreement is not installed")
        return Response(png, media_type="image/png")

    @app.get("/admin/export")
    def admin_export(s: Admin, format: str = "rankings"):
        return _export(ctx, format)
