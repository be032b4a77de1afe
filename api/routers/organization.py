"""/v1/organization/projects and their api_keys, shaped like OpenAI's admin API. Platform admins manage every
project; a project's admin manages its own keys; anyone else is told 403 for their own project and 404 for
another's (never a 403 that would confirm it exists)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from api.deps import get_caller, get_db
from api.errors import OpenAIError
from api.pagination import paginate
from vbatch_pipelines import projects
from vbatch_pipelines.projects import Caller
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import ApiKey, AuditEvent, Project

router = APIRouter(prefix="/organization", tags=["organization"])


class ProjectBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=128)


class KeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=128)
    owner: str = Field(max_length=256, description="who holds the key (a name or an email)")
    role: projects.ProjectRole = "member"


def _platform_admin(caller: Caller) -> None:
    if not caller.platform_admin:
        raise OpenAIError(403, "This needs a platform admin key (VBATCH_ADMIN_KEYS)", code="admin_key_required")


def _visible_project(db: Database, caller: Caller, project_id: str) -> Project:
    """The project, if the caller may see it: a platform admin any, others their own (another's is a 404)."""
    if not caller.platform_admin and project_id != caller.project_id:
        raise projects.ProjectNotFound(f"No project with id '{project_id}'", "project_id")
    return projects.get_project(db, project_id)


def _managed_project(db: Database, caller: Caller, project_id: str) -> Project:
    project = _visible_project(db, caller, project_id)
    if not caller.may_manage(project_id):
        raise OpenAIError(403, f"Managing the keys of '{project_id}' needs an admin key of that project",
                          code="project_admin_required")
    return project


@router.get("/projects")
async def list_projects(after: str | None = None, limit: int = Query(default=20, ge=1, le=100),
                        include_archived: bool = False, db: Database = Depends(get_db),
                        caller: Caller = Depends(get_caller)) -> dict:
    where = [] if include_archived else [Project.archived_at.is_(None)]
    if not caller.platform_admin:
        where.append(Project.id == caller.project_id)
    with db.session() as session:
        return paginate(session, Project, after=after, limit=limit, order="asc", where=where)


@router.post("/projects")
async def create_project(body: ProjectBody, db: Database = Depends(get_db),
                         caller: Caller = Depends(get_caller)) -> dict:
    _platform_admin(caller)
    project = await asyncio.to_thread(projects.create_project, db, body.name)
    await asyncio.to_thread(projects.audit, db, caller, "project.created", project.id, name=project.name)
    return project.to_openai()


@router.get("/projects/{project_id}")
async def retrieve_project(project_id: str, db: Database = Depends(get_db),
                           caller: Caller = Depends(get_caller)) -> dict:
    return _visible_project(db, caller, project_id).to_openai()


@router.post("/projects/{project_id}")
async def modify_project(project_id: str, body: ProjectBody, db: Database = Depends(get_db),
                         caller: Caller = Depends(get_caller)) -> dict:
    _platform_admin(caller)
    project = await asyncio.to_thread(projects.rename_project, db, project_id, body.name)
    await asyncio.to_thread(projects.audit, db, caller, "project.updated", project_id, name=project.name)
    return project.to_openai()


@router.post("/projects/{project_id}/archive")
async def archive_project(project_id: str, db: Database = Depends(get_db),
                          caller: Caller = Depends(get_caller)) -> dict:
    _platform_admin(caller)
    project = await asyncio.to_thread(projects.archive_project, db, project_id)
    await asyncio.to_thread(projects.audit, db, caller, "project.archived", project_id)
    return project.to_openai()


@router.get("/projects/{project_id}/api_keys")
async def list_keys(project_id: str, after: str | None = None, limit: int = Query(default=20, ge=1, le=100),
                    db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    _managed_project(db, caller, project_id)
    with db.session() as session:
        return paginate(session, ApiKey, after=after, limit=limit, order="asc",
                        where=[ApiKey.project_id == project_id, ApiKey.revoked_at.is_(None)])


@router.post("/projects/{project_id}/api_keys")
async def create_key(project_id: str, body: KeyBody, request: Request, db: Database = Depends(get_db),
                     caller: Caller = Depends(get_caller)) -> dict:
    """A new key; its secret is in ``value``, this once (only its hash is kept). From the first key on, every
    request needs one."""
    _managed_project(db, caller, project_id)
    key, secret = await asyncio.to_thread(projects.create_key, db, project_id, body.name, body.owner, body.role,
                                          caller.key_name if caller.key_id is None else caller.key_id)
    request.app.state.keys_made = True
    await asyncio.to_thread(projects.audit, db, caller, "api_key.created", key.id, name=key.name, owner=key.owner,
                            role=key.role, project_id=project_id)
    return {**key.to_openai(), "value": secret}


@router.get("/projects/{project_id}/api_keys/{key_id}")
async def retrieve_key(project_id: str, key_id: str, db: Database = Depends(get_db),
                       caller: Caller = Depends(get_caller)) -> dict:
    _managed_project(db, caller, project_id)
    return projects.get_key(db, key_id, project_id).to_openai()


@router.delete("/projects/{project_id}/api_keys/{key_id}")
async def delete_key(project_id: str, key_id: str, db: Database = Depends(get_db),
                     caller: Caller = Depends(get_caller)) -> dict:
    """Revoke the key: refused from its next request on (its record stays, for who-did-what)."""
    _managed_project(db, caller, project_id)
    key = await asyncio.to_thread(projects.revoke_key, db, key_id, project_id)
    await asyncio.to_thread(projects.audit, db, caller, "api_key.revoked", key_id, name=key.name, project_id=project_id)
    return {"object": "organization.project.api_key.deleted", "id": key_id, "deleted": True}


@router.get("/audit_logs")
async def list_audit_logs(event_types: list[str] | None = Query(default=None, alias="event_types[]"),
                          project_ids: list[str] | None = Query(default=None, alias="project_ids[]"),
                          after: str | None = None, limit: int = Query(default=20, ge=1, le=100),
                          db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    """Who did what and when, newest first (platform admins), as OpenAI's audit logs: ``event_types[]`` and
    ``project_ids[]`` narrow it."""
    _platform_admin(caller)
    where = []
    if event_types:
        where.append(AuditEvent.type.in_(event_types[:50]))
    if project_ids:
        where.append(AuditEvent.project_id.in_(project_ids[:50]))
    with db.session() as session:
        return paginate(session, AuditEvent, after=after, limit=limit, order="desc", where=where)
