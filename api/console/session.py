"""Logging in and out of the console: an API key opens a server-side session (its cookie holds a random token,
never the key)."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api.console import (
    COOKIE,
    log,
    safe_next,
    templates,
)
from api.deps import caller_of

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/ui", error: str | None = None) -> HTMLResponse:
    return templates.TemplateResponse(request, "login.html", {"next": safe_next(next), "error": error,
                                                              "role": None, "keys_on": True})


@router.post("/login")
def login(request: Request, key: str = Form(max_length=512), next: str = Form("/ui")) -> Response:
    """A key for a session: the cookie holds a session token kept server-side (never the key), HttpOnly,
    SameSite=Strict, Secure when the request came over HTTPS (directly, or through a proxy uvicorn trusts:
    VBATCH_FORWARDED_ALLOW_IPS). Each refused key is logged with the client's address; an address with too many
    recent refusals is answered 429 without its key being tried."""
    throttle, address = request.app.state.login_throttle, request.client.host if request.client else "?"
    wait = throttle.wait_s(address)
    if wait:
        log.warning("console login from %s refused unchecked: too many failed logins (retry in %.0fs)", address, wait)
        response = templates.TemplateResponse(request, "login.html", {
            "next": safe_next(next), "role": None, "keys_on": True,
            "error": f"Too many failed logins from your address: try again in {max(1, round(wait))} seconds"},
            status_code=429)
        response.headers["Retry-After"] = str(max(1, round(wait)))
        return response
    if caller_of(request.app.state.settings, request.app.state.db, key.strip()) is None:
        failures = throttle.failed(address)
        log.warning("console login from %s refused: invalid key (%d failed in the last %.0fs)", address, failures,
                    throttle.window_s)
        return RedirectResponse(f"/ui/login?error=That+key+is+not+valid&next={quote(safe_next(next))}",
                                status_code=303)
    throttle.succeeded(address)
    from vbatch_pipelines.projects import SESSION_TTL_S, start_session

    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(COOKIE, start_session(request.app.state.db, key.strip()), max_age=SESSION_TTL_S,
                        httponly=True, samesite="strict", path="/ui", secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    """Ends the session on the server too: its token, wherever a copy of the cookie went, opens nothing more."""
    from vbatch_pipelines.projects import end_session

    token = request.cookies.get(COOKIE)
    if token:
        end_session(request.app.state.db, token)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response
