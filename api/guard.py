"""Protections in front of every route, as pure ASGI middleware (no cost beyond a few header lookups).

- ``BodyLimit``: a request body is bounded while it streams (chunked bodies too, not only by Content-Length):
  uploads to ``/v1/files`` by VBATCH_MAX_UPLOAD_BYTES, any other body by VBATCH_MAX_REQUEST_BYTES. Once over,
  the body is read no further and the answer is a 413, whatever the route was doing with it.
- ``DriveByGuard``: without API keys the API trusts whoever can reach it, which must then be this machine's
  own user and not a web page their browser happens to show. It answers only requests whose Host is a
  loopback name or in VBATCH_ALLOWED_HOSTS (DNS rebinding), refuses a foreign ``Origin`` and, on
  state-changing methods, any body that is not ``application/json`` or ``multipart/form-data`` (a plain
  HTML form or a ``text/plain`` fetch cannot set those without a CORS preflight this API never grants).
- ``KeyBeforeBody``: with keys required, a request that could carry a body (to the API, or a console form) is
  authenticated from its headers before a byte of its body is read: an anonymous 512 MiB upload costs vbatch
  nothing. The caller it found is handed on (``scope["state"]``), so the route does not look the key up again.
- ``LoginThrottle``: the console's login form is where a key can be guessed: each failure is logged with the
  client's address, and an address with too many recent failures is refused without its key being tried.
- ``NoFraming``: no other site may show vbatch's pages in a frame (``frame-ancestors 'none'``, and the older
  ``X-Frame-Options: DENY``): a framed console form would carry this origin past the Origin check (clickjacking).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from api.errors import OpenAIError, error_response
from vbatch_pipelines.files import FileTooLarge

log = logging.getLogger("vbatch.guard")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
BODY_TYPES = ("application/json", "multipart/form-data")
MULTIPART_OVERHEAD = 1024 * 1024  # part headers and boundaries around an upload at the limit


class _TooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app, *, max_upload_bytes: int, max_request_bytes: int):
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_request_bytes = max_request_bytes

    def _error(self, upload: bool) -> OpenAIError | FileTooLarge:
        if upload:
            return FileTooLarge(self.max_upload_bytes)
        return OpenAIError(413, f"The request body is larger than {self.max_request_bytes} bytes "
                                "(VBATCH_MAX_REQUEST_BYTES)", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/files")
        limit = self.max_upload_bytes + MULTIPART_OVERHEAD if upload else self.max_request_bytes
        length = _header(scope, b"content-length")
        if length.isdigit() and int(length) > limit:  # refused before a byte of the body is read
            return await error_response(self._error(upload))(scope, receive, send)

        state = {"received": 0, "over": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            # Whatever the route made of the cut-off body (a parse error, say), the answer is the 413.
            if state["over"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await error_response(self._error(upload))(scope, receive, send)


FORM_TYPE = "application/x-www-form-urlencoded"


class DriveByGuard:
    """``what`` names the server in refusals; ``form_paths`` are where form posts from its own pages are taken;
    ``body_types`` the bodies it takes on state-changing methods otherwise. WebSocket handshakes are held to the
    same Host and Origin rules (a foreign page may open a socket without any preflight)."""

    def __init__(self, app, *, allowed_hosts: tuple[str, ...] | frozenset[str], enabled: Callable[[], bool],
                 what: str = "without API keys vbatch", form_paths: tuple[str, ...] = ("/ui/",),
                 body_types: tuple[str, ...] = BODY_TYPES):
        self.app = app
        self.allowed = LOOPBACK_NAMES | {host.lower() for host in allowed_hosts}
        self.enabled = enabled  # asked per request: off once any key exists (settings keys, or a project key made)
        self.what, self.form_paths, self.body_types = what, form_paths, body_types

    def _refusal(self, scope) -> OpenAIError | None:
        host = _hostname(_header(scope, b"host"))
        if host not in self.allowed:
            return OpenAIError(403, f"Host {host or '(none)'!r} is not served here: {self.what} answers only "
                                    "loopback names and VBATCH_ALLOWED_HOSTS", code="host_not_allowed")
        origin = _header(scope, b"origin")
        if origin and _hostname(urlsplit(origin).netloc) not in self.allowed:
            return OpenAIError(403, f"Requests from pages at {origin} are refused: {self.what} answers only this "
                                    "machine's own clients and pages", code="origin_not_allowed")
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS:
            media_type = _header(scope, b"content-type").split(";", 1)[0].strip().lower()
            has_body = _header(scope, b"content-length") not in ("", "0") or _header(scope, b"transfer-encoding")
            # The console's forms post form-urlencoded bodies from its own pages: accepted with an Origin this
            # guard allows (checked above; browsers send one with every form POST), never without one.
            own_form = scope["path"].startswith(self.form_paths) and media_type == FORM_TYPE and origin
            if (media_type or has_body) and media_type not in self.body_types and not own_form:
                return OpenAIError(415, f"Content-Type {media_type or '(none)'!r} is not accepted; send "
                                        f"{' or '.join(self.body_types)}", code="unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and self.enabled():
            refusal = self._refusal(scope)
            if refusal is not None and scope["type"] == "websocket":
                log.warning("refused a WebSocket to %s: %s", scope["path"], refusal.message)
                return await send({"type": "websocket.close", "code": 1008})  # before accept: answered 403
            if refusal is not None:
                return await error_response(refusal)(scope, receive, send)
        return await self.app(scope, receive, send)


def _header(scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def _hostname(netloc: str) -> str:
    """``host[:port]`` or ``[v6]:port`` → the lower-cased host."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


FRAME_HEADERS = [(b"content-security-policy", b"frame-ancestors 'none'"), (b"x-frame-options", b"DENY")]


class NoFraming:
    """Every answer says it must not be framed: the console's pages, and anything else a browser might render."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def framed_never(message):
            if message["type"] == "http.response.start":
                # A policy the app set without frame-ancestors gets ours beside it (browsers enforce each one).
                headers = message.get("headers", [])
                present = {name.lower() for name, value in headers
                           if name.lower() != b"content-security-policy" or b"frame-ancestors" in value}
                message = {**message, "headers": [*headers, *(h for h in FRAME_HEADERS if h[0] not in present)]}
            await send(message)

        await self.app(scope, receive, framed_never)


class KeyBeforeBody:
    """A key check that needs only headers, ahead of anything that reads the body. Exempt: Label Studio's webhooks
    (their own shared secret) and the console's login form (it brings the key)."""

    def __init__(self, app, *, required: Callable[[], bool], caller_of: Callable[[str], object | None],
                 session_of: Callable[[str], object | None]):
        self.app = app
        self.required = required  # whether a request needs a key now (deps.keys_required)
        self.caller_of = caller_of  # the caller a key makes, None for an unknown or revoked one (deps.caller_of)
        self.session_of = session_of  # the caller of a console session's token (deps.caller_of_session)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in UNSAFE_METHODS:
            return await self.app(scope, receive, send)
        path = scope["path"]
        console = path.startswith("/ui/")
        if path.startswith("/v1/webhooks/") or path == "/ui/login" or not (
                console or path.startswith("/v1/") or path.startswith("/metrics")):
            return await self.app(scope, receive, send)
        import asyncio

        if not self.required():
            return await self.app(scope, receive, send)
        token = _cookie(scope, CONSOLE_COOKIE) if console else _bearer(scope)
        caller = await asyncio.to_thread(self.session_of if console else self.caller_of, token) if token else None
        if caller is None:
            if console:  # the console's own answer to a missing login: its login page
                from urllib.parse import quote

                from starlette.responses import RedirectResponse

                return await RedirectResponse(f"/ui/login?next={quote(path)}", status_code=303)(scope, receive, send)
            refusal = OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key") if token else \
                OpenAIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                            code="missing_api_key")
            return await error_response(refusal)(scope, receive, send)
        scope.setdefault("state", {})[AUTHENTICATED] = caller
        return await self.app(scope, receive, send)


AUTHENTICATED = "authenticated_caller"  # where KeyBeforeBody leaves the caller it found, for the route's dependency
CONSOLE_COOKIE = "vbatch_console"


def _bearer(scope) -> str | None:
    authorization = _header(scope, b"authorization")
    return authorization.removeprefix("Bearer ").strip() or None if authorization.startswith("Bearer ") else None


def _cookie(scope, name: str) -> str | None:
    from http.cookies import SimpleCookie

    jar = SimpleCookie()
    try:
        jar.load(_header(scope, b"cookie"))
    except Exception:  # noqa: BLE001 - a malformed Cookie header is no login
        return None
    return jar[name].value if name in jar else None


class LoginThrottle:
    """Failed console logins per client address over a sliding window (this API process's own count)."""

    def __init__(self, max_failures: int = 5, window_s: float = 300.0):
        import threading

        self.max_failures, self.window_s = max_failures, window_s
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> list[float]:
        recent = [t for t in self._failures.get(address, []) if now - t < self.window_s]
        if recent:
            self._failures[address] = recent
        else:
            self._failures.pop(address, None)
        return recent

    def wait_s(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: now)."""
        import time

        with self._lock:
            now = time.monotonic()
            recent = self._recent(address, now)
            return self.window_s - (now - recent[0]) if len(recent) >= self.max_failures else 0.0

    def failed(self, address: str) -> int:
        """Count a failure; returns the address's failures in the window."""
        import time

        with self._lock:
            now = time.monotonic()
            recent = self._recent(address, now)
            recent.append(now)
            self._failures[address] = recent
            return len(recent)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)
