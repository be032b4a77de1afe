"""The web console (``/ui``) for people who do not write code: server-rendered pages over the same domain
functions the REST API uses, with the same roles. Login takes an API key, kept in an HttpOnly, SameSite=Strict
cookie; with no keys configured (a loopback-only platform) its one user is the operator, as for the API. Like the
API, it shows a key only its own project's batches, files, fine-tunes, datasets and fine-tuned models: another
project's id gets the page a missing one gets.

This package holds what every page shares (the login check, rendering, lists); the pages are one module each
(``session``, ``dashboard``, ``batches``, ``fine_tunes``, ``models``, ``projects``, ``evals``, ``datasets``,
``review``), as the API's routers are."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from api.deps import Role, caller_of_session, keys_required
from api.guard import AUTHENTICATED, CONSOLE_COOKIE
from vbatch_pipelines.projects import Caller

HERE = Path(__file__).parent
COOKIE = CONSOLE_COOKIE
log = logging.getLogger("vbatch.console")
templates = Jinja2Templates(directory=str(HERE / "templates"))


class LoginRequired(Exception):
    """The console's own 401: a redirect to the login page, not an API error."""

    def __init__(self, next_path: str):
        self.next_path = next_path


def keys_on(request: Request) -> bool:
    return keys_required(request.app.state)


def console_caller(request: Request) -> Caller:
    """Who uses the console (for the audit log): the caller ``console_login`` found for this request (every
    console route depends on it, through ``console_role``)."""
    return request.state.console_caller


def console_audit(request: Request, type: str, target: str, **details) -> None:
    from vbatch_pipelines.projects import audit

    audit(request.app.state.db, console_caller(request), type, target, **details)


def console_login(request: Request) -> Caller:
    """The logged-in caller (the operator when no key exists), or the login page. Every page's data is its
    project's (``caller.project_id``)."""
    from vbatch_pipelines.projects import OPERATOR

    if not keys_on(request):
        caller = OPERATOR
    else:
        caller = getattr(request.state, AUTHENTICATED, None) or caller_of_session(  # a form's: checked already
            request.app.state.settings, request.app.state.db, request.cookies.get(COOKIE, ""))
        if caller is None:
            raise LoginRequired(request.url.path)
    request.state.console_caller = caller
    return caller


def console_role(caller: Caller = Depends(console_login)) -> Role:
    return caller.role


def render(request: Request, name: str, role: Role, **context) -> HTMLResponse:
    settings = request.app.state.settings
    return templates.TemplateResponse(request, name, {
        "role": role, "keys_on": keys_on(request), "project": _project_of(request),
        "extension_links": getattr(request.app.state, "console_links", []),
        "dagster_url": settings.dagster.url, "label_studio_url": _label_studio_url(request), **context})


def extension_page(request: Request, title: str, body: Markup, role: Role) -> HTMLResponse:
    """An extension's console page in the console's frame (header, nav, login); ``body`` is HTML the extension
    built with its values escaped (``markupsafe.escape``)."""
    return render(request, "extension.html", role, title=title, body=body)


def _project_of(request: Request) -> dict | None:
    """The logged-in caller's project as the header shows it (its name, else its id)."""
    from vbatch_pipelines.store.models import Project

    caller = getattr(request.state, "console_caller", None)
    if caller is None:
        return None
    row = request.app.state.db.get(Project, caller.project_id)
    return {"id": caller.project_id, "name": row.name if row is not None else caller.project_id}


def missing_page(request: Request, role: Role, what: str, back: str) -> HTMLResponse:
    """The page for an id that is not there - or is another project's: the same page, the same words."""
    return render(request, "missing.html", role, what=what, back=back)


def _label_studio_url(request: Request) -> str | None:
    resource = request.app.state.resources.label_studio
    return resource.url if resource.enabled and resource.url else None


def list_page(session, model, after: str | None, where=()) -> dict:
    """25 rows (those ``where`` selects: the caller's project's) after ``after``; an ``after`` that is not on the
    list (a stale link, another project's id) starts from the newest."""
    from api.errors import OpenAIError
    from api.pagination import paginate

    try:
        return paginate(session, model, after=after, limit=25, where=where)
    except OpenAIError:
        return paginate(session, model, after=None, limit=25, where=where)


def comparison_verdict(comparison: dict | None) -> str | None:
    """One line for a comparison: how the fine-tune's normalized match moved against its base model's."""
    if not comparison or not comparison.get("examples"):
        return None
    base = (comparison.get("base") or {}).get("normalized_match")
    tuned = (comparison.get("fine_tuned") or {}).get("normalized_match")
    if base is None or tuned is None:
        return None
    word = "better" if tuned > base else "worse" if tuned < base else "the same"
    return f"{word}: {base:g} → {tuned:g} normalized match on {comparison['examples']} examples"


def safe_next(path: str) -> str:
    """Only a console path: a login link must not send anyone elsewhere."""
    return path if path.startswith("/ui") and "//" not in path and "\\" not in path else "/ui"


def install(app, extensions: list | None = None) -> None:
    """Mount the console, its static files and the enabled extensions' pages (``/ui/ext/<name>/``, their links
    in the nav) on the API's app."""
    from fastapi.staticfiles import StaticFiles

    from api.console import batches, dashboard, datasets, evals, fine_tunes, models, projects, review, session

    for page in (session, dashboard, batches, fine_tunes, models, projects, evals, datasets, review):
        app.include_router(page.router)
    app.state.console_links = []
    for extension in extensions or []:
        if extension.console is not None:
            app.include_router(extension.console(), prefix=f"/ui/ext/{extension.name}",
                               dependencies=[Depends(console_login)], include_in_schema=False)
            app.state.console_links += [(label, f"/ui/ext/{extension.name}/{path.lstrip('/')}")
                                        for label, path in extension.console_links]
    app.mount("/ui/static", StaticFiles(directory=str(HERE / "static")), name="console-static")

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/ui/login?next={quote(safe_next(exc.next_path))}", status_code=303)
