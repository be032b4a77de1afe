"""Projects, their keys and the audit log (admins)."""

from __future__ import annotations

import time
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api.console import (
    console_audit,
    console_role,
    list_page,
    render,
)
from api.deps import Role

router = APIRouter(prefix="/ui", include_in_schema=False)


def _projects_page(request: Request, role: Role, error: str | None = None) -> HTMLResponse:
    from sqlalchemy import func, select

    from vbatch_pipelines.store.models import ApiKey, Project

    if role != "admin":
        return render(request, "projects.html", role, projects=[], error="Projects are managed with an admin key.")
    with request.app.state.db.session() as session:
        counts = dict(session.execute(select(ApiKey.project_id, func.count()).where(ApiKey.revoked_at.is_(None))
                                      .group_by(ApiKey.project_id)).all())
        rows = [{**project.to_openai(), "keys": counts.get(project.id, 0)}
                for project in session.scalars(select(Project).order_by(Project.created_at, Project.id))]
    return render(request, "projects.html", role, projects=rows, error=error)


@router.get("/projects", response_class=HTMLResponse)
def projects_page(request: Request, error: str | None = Query(default=None, max_length=300),
                  role: Role = Depends(console_role)) -> HTMLResponse:
    return _projects_page(request, role, error)


@router.post("/projects")
def create_project_from_form(request: Request, name: str = Form(max_length=128),
                             role: Role = Depends(console_role)) -> Response:
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.projects import create_project

    if role != "admin":
        return _projects_page(request, role)
    try:
        project = create_project(request.app.state.db, name)
    except VbatchError as exc:
        return RedirectResponse(f"/ui/projects?error={quote(str(exc)[:300])}", status_code=303)
    console_audit(request, "project.created", project.id, name=project.name)
    return RedirectResponse(f"/ui/projects/{quote(project.id)}", status_code=303)


def _project_page(request: Request, role: Role, project_id: str, error: str | None = None, new_key=None,
                  new_secret: str | None = None) -> HTMLResponse:
    from vbatch_pipelines.errors import NotFound
    from vbatch_pipelines.projects import get_project, list_keys

    if role != "admin":
        return _projects_page(request, role)
    db = request.app.state.db
    try:
        project = get_project(db, project_id[:64])
    except NotFound:
        return render(request, "missing.html", role, what=f"project {project_id[:64]}", back="/ui/projects")
    keys = [{**key.to_openai(), "owner": key.owner, "last_used": time.strftime("%Y-%m-%d %H:%M",
             time.localtime(key.last_used_at)) if key.last_used_at else None} for key in list_keys(db, project.id)]
    return render(request, "project.html", role, project=project.to_openai(), keys=keys, error=error,
                 new_key=new_key, new_secret=new_secret)


@router.get("/projects/{project_id}", response_class=HTMLResponse)
def project_page(request: Request, project_id: str, error: str | None = Query(default=None, max_length=300),
                 role: Role = Depends(console_role)) -> HTMLResponse:
    return _project_page(request, role, project_id, error)


@router.post("/projects/{project_id}/keys", response_class=HTMLResponse)
def create_key_from_form(request: Request, project_id: str, name: str = Form(max_length=128),
                         owner: str = Form(max_length=256), key_role: str = Form("member", alias="role", max_length=16),
                         role: Role = Depends(console_role)) -> Response:
    """The new key's secret is on the page this answer renders, this once (never in a URL or a redirect)."""
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.projects import create_key

    if role != "admin":
        return _projects_page(request, role)
    try:
        key, secret = create_key(request.app.state.db, project_id[:64], name, owner, key_role,
                                 created_by="console (admin)")
    except VbatchError as exc:
        return _project_page(request, role, project_id, error=str(exc)[:300])
    request.app.state.keys_made = True
    console_audit(request, "api_key.created", key.id, name=key.name, owner=key.owner, role=key.role,
                  project_id=key.project_id)
    return _project_page(request, role, project_id, new_key=key, new_secret=secret)


@router.post("/projects/{project_id}/keys/{key_id}/revoke")
def revoke_key_from_form(request: Request, project_id: str, key_id: str, role: Role = Depends(console_role)) -> Response:
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.projects import revoke_key

    if role != "admin":
        return _projects_page(request, role)
    try:
        key = revoke_key(request.app.state.db, key_id[:64], project_id[:64])
    except VbatchError as exc:
        return RedirectResponse(f"/ui/projects/{quote(project_id[:64])}?error={quote(str(exc)[:300])}",
                                status_code=303)
    console_audit(request, "api_key.revoked", key.id, name=key.name, project_id=key.project_id)
    return RedirectResponse(f"/ui/projects/{quote(project_id[:64])}", status_code=303)


@router.post("/projects/{project_id}/archive")
def archive_project_from_form(request: Request, project_id: str, role: Role = Depends(console_role)) -> Response:
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.projects import archive_project

    if role != "admin":
        return _projects_page(request, role)
    try:
        archive_project(request.app.state.db, project_id[:64])
    except VbatchError as exc:
        return RedirectResponse(f"/ui/projects/{quote(project_id[:64])}?error={quote(str(exc)[:300])}",
                                status_code=303)
    console_audit(request, "project.archived", project_id[:64])
    return RedirectResponse("/ui/projects", status_code=303)


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, after: str | None = Query(default=None, max_length=64),
               role: Role = Depends(console_role)) -> HTMLResponse:
    """Who did what and when, newest first (platform admins), as ``GET /v1/organization/audit_logs``."""
    import json as json_module

    from vbatch_pipelines.store.models import AuditEvent

    if role != "admin":
        return render(request, "audit.html", role, events=[], page={}, error="The audit log needs an admin key.")
    with request.app.state.db.session() as session:
        page = list_page(session, AuditEvent, after)
        rows = session.query(AuditEvent).filter(AuditEvent.id.in_([e["id"] for e in page["data"]])).all()
    by_id = {row.id: row for row in rows}
    events = [{"when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.created_at)), "type": row.type,
               "target": row.target, "actor": row.actor, "project_id": row.project_id,
               "details": json_module.dumps(row.details) if row.details else ""}
              for row in (by_id[e["id"]] for e in page["data"])]
    return render(request, "audit.html", role, events=events, page=page)
