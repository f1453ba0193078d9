"""The labeling app's guards (:mod:`lmcycle.feedback.web`): security headers, token comparison, login
throttling, bounded request bodies, and the API's error.

Nothing here knows the store: these are the pieces a review of the app's HTTP surface reads first.
"""

import hmac
import json
import threading
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import Depends, Request

MAX_BODY = 1 << 20  # bytes; the largest label is a few kB
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


class ApiError(Exception):
    """An HTTP error with the API's body (or, on a page, the error page)."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


class LoginLimiter:
    """At most ``attempts`` failed logins per key within ``window_s`` seconds of ``clock``; thread-safe. Past
    ``max_keys`` keys, those with no failure left in the window are dropped, so that failures spread over
    many made-up names cannot grow the table without bound."""

    def __init__(self, attempts: int, window_s: float, clock: Callable[[], float], max_keys: int = 10_000):
        self.attempts, self.window_s, self.clock, self.max_keys = attempts, window_s, clock, max_keys
        self._failures: dict[Any, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: Any, now: float) -> list[float]:
        times = [t for t in self._failures.get(key, []) if t > now - self.window_s]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)  # forgotten keys keep the table as small as the recent failures
        return times

    def retry_after(self, key: Any) -> float | None:
        """Seconds until ``key`` may try again, or None if it may now."""
        with self._lock:
            now = self.clock()
            times = self._recent(key, now)
            return times[0] + self.window_s - now if len(times) >= self.attempts else None

    def failed(self, key: Any) -> None:
        """Count a failed attempt of ``key``."""
        with self._lock:
            now = self.clock()
            self._failures[key] = [*self._recent(key, now), now]
            if len(self._failures) > self.max_keys:
                self._failures = {k: t for k, t in self._failures.items() if t[-1] > now - self.window_s}

    def succeeded(self, key: Any) -> None:
        """Forget ``key``'s failures."""
        with self._lock:
            self._failures.pop(key, None)


class SecurityHeaders:
    """ASGI middleware: the security headers on every response, and ``Cache-Control: no-store`` on all but
    the static files (pages and API answers are per user and must not linger in a shared cache)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                ours = {**SECURITY_HEADERS, **({} if static else {"Cache-Control": "no-store"})}
                names = {name.lower().encode("latin-1") for name in ours}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                                         for k, v in ours.items()]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def same_token(given: str, expected: str) -> bool:
    """Constant-time equality of two tokens (False when either is empty)."""
    return bool(given) and bool(expected) and hmac.compare_digest(given.encode("utf-8", "replace"),
                                                                   expected.encode("utf-8", "replace"))


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise ApiError(413, f"the body is larger than {MAX_BODY} bytes", field="body")
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked upload says no length: count while reading
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"the body is larger than {MAX_BODY} bytes", field="body")
        chunks.append(chunk)
    return b"".join(chunks)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def json_body(request: Request) -> Any:
    """The request's JSON body (415 unless it says ``application/json``, 400 if it does not parse)."""
    if _content_type(request) != "application/json":
        raise ApiError(415, "send JSON with Content-Type: application/json", field="Content-Type")
    raw = await _read_body(request)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON", field="body") from None


async def form_fields(request: Request) -> dict[str, str]:
    """A page form's fields (``application/x-www-form-urlencoded``; a repeated name keeps its first value)."""
    if _content_type(request) != "application/x-www-form-urlencoded":
        raise ApiError(415, "send the page's form", field="Content-Type")
    raw = await _read_body(request)
    try:
        pairs = parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=1000)
    except ValueError:
        raise ApiError(400, "too many form fields", field="body") from None
    fields: dict[str, str] = {}
    for key, value in pairs:
        fields.setdefault(key, value)
    return fields


JsonBody = Annotated[Any, Depends(json_body)]
Form = Annotated[dict, Depends(form_fields)]


JsonBody = Annotated[Any, Depends(json_body)]
Form = Annotated[dict, Depends(form_fields)]
