"""/v1/organization/projects and their api_keys, shaped like OpenAI's admin API. Platform admins manage every
project; a project's admin manages its own keys; anyone else is told 403 for their own project and 404 for
another's (never a 403 that would confirm it exists)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from api.deps import get_caller, get_db
from api.errors import OpenAIError
from api.pagination import paginate
from api.schemas import StrictBody
from vbatch_pipelines import projects
from vbatch_pipelines.curation.service import MAX_REVIEWERS, set_review_policy
from vbatch_pipelines.projects import Caller
from vbatch_pipelines.quotas import set_quotas
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import ApiKey, AuditEvent, Project
from vbatch_pipelines.usage import COMPLETIONS, EMBEDDINGS, usage_page

log = logging.getLogger("vbatch.api")
router = APIRouter(prefix="/organization", tags=["organization"])


class ProjectBody(StrictBody):
    name: str = Field(max_length=128)


class KeyBody(StrictBody):
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
def list_projects(after: str | None = None, limit: int = Query(default=20, ge=1, le=100),
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
def retrieve_project(project_id: str, db: Database = Depends(get_db),
                     caller: Caller = Depends(get_caller)) -> dict:
    return _visible_project(db, caller, project_id).to_openai()


class Quotas(StrictBody):
    max_concurrent_batches: int | None = Field(default=None, ge=1, description="batches not yet ended")
    max_queued_requests: int | None = Field(default=None, ge=1, description="requests of its batches not yet run")
    max_tokens_per_day: int | None = Field(default=None, ge=1, description="input and output tokens per UTC day")


class ReviewPolicyBody(StrictBody):
    annotations_per_task: int | None = Field(default=None, ge=1, le=MAX_REVIEWERS,
                                             description="N: annotations (reviewers) wanted per task")
    gold_star_agreement: int | None = Field(default=None, ge=1, le=MAX_REVIEWERS,
                                            description="k: how many of them must star a task for a gold star")


class ModifyProjectBody(StrictBody):
    name: str | None = Field(default=None, max_length=128)
    quotas: Quotas | None = Field(default=None, description="vbatch's own: the limits given are set (null: none)")
    weight: int | None = Field(default=None, ge=1, le=100, description="vbatch's own: its share of the engine when "
                               "several projects' batches run (default 1)")
    review: ReviewPolicyBody | None = Field(default=None, description="vbatch's own: its review policy (a project "
                                            "admin may set it alone)")


@router.post("/projects/{project_id}")
async def modify_project(project_id: str, body: ModifyProjectBody, request: Request, db: Database = Depends(get_db),
                         caller: Caller = Depends(get_caller)) -> dict:
    """Rename a project, and (vbatch's own) set its quotas and fair-share weight: platform admins only; its review
    policy: its own admins too (Label Studio then hands each of its tasks to N reviewers)."""
    if body.model_fields_set == {"review"}:
        await asyncio.to_thread(_managed_project, db, caller, project_id)
    else:
        _platform_admin(caller)
    await asyncio.to_thread(projects.get_project, db, project_id)
    if body.review is not None:
        policy = body.review.model_dump(exclude_none=True)
        await asyncio.to_thread(lambda: set_review_policy(db, project_id, **policy))
        await asyncio.to_thread(_tell_label_studio, request, project_id)
    if body.name is not None:
        await asyncio.to_thread(projects.rename_project, db, project_id, body.name)
    changes = body.quotas.model_dump(exclude_unset=True) if body.quotas is not None else {}
    if changes or body.weight is not None:
        await asyncio.to_thread(lambda: set_quotas(db, project_id, weight=body.weight, **changes))
    project = await asyncio.to_thread(projects.get_project, db, project_id)
    await asyncio.to_thread(projects.audit, db, caller, "project.updated", project_id, name=project.name,
                            **({"quotas": changes} if changes else {}),
                            **({"weight": body.weight} if body.weight is not None else {}),
                            **({"review": project.review_policy()} if body.review is not None else {}))
    return project.to_openai()


def _tell_label_studio(request: Request, project_id: str) -> None:
    """Label Studio hands each task of the project's review projects to N reviewers; down: it is told when the
    next batch's tasks are imported."""
    from resources.label_studio import LabelStudioUnavailable

    label_studio = request.app.state.resources.label_studio
    project = projects.get_project(request.app.state.db, project_id)
    if not label_studio.enabled:
        return
    try:
        team = label_studio.for_project(project_id, project.name)
        for ls_project in team.projects():
            team.set_annotations_per_task(ls_project, project.review_annotations)
    except LabelStudioUnavailable as exc:
        log.warning("Label Studio not told of %s's review policy now: %s", project_id, exc)


@router.post("/projects/{project_id}/archive")
async def archive_project(project_id: str, db: Database = Depends(get_db),
                          caller: Caller = Depends(get_caller)) -> dict:
    _platform_admin(caller)
    project = await asyncio.to_thread(projects.archive_project, db, project_id)
    await asyncio.to_thread(projects.audit, db, caller, "project.archived", project_id)
    return project.to_openai()


@router.get("/projects/{project_id}/api_keys")
def list_keys(project_id: str, after: str | None = None, limit: int = Query(default=20, ge=1, le=100),
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
    await asyncio.to_thread(_managed_project, db, caller, project_id)
    key, secret = await asyncio.to_thread(projects.create_key, db, project_id, body.name, body.owner, body.role,
                                          caller.key_name if caller.key_id is None else caller.key_id)
    request.app.state.keys_made = True
    await asyncio.to_thread(projects.audit, db, caller, "api_key.created", key.id, name=key.name, owner=key.owner,
                            role=key.role, project_id=project_id)
    return {**key.to_openai(), "value": secret}


@router.get("/projects/{project_id}/api_keys/{key_id}")
def retrieve_key(project_id: str, key_id: str, db: Database = Depends(get_db),
                 caller: Caller = Depends(get_caller)) -> dict:
    _managed_project(db, caller, project_id)
    return projects.get_key(db, key_id, project_id).to_openai()


@router.delete("/projects/{project_id}/api_keys/{key_id}")
async def delete_key(project_id: str, key_id: str, db: Database = Depends(get_db),
                     caller: Caller = Depends(get_caller)) -> dict:
    """Revoke the key: refused from its next request on (its record stays, for who-did-what)."""
    await asyncio.to_thread(_managed_project, db, caller, project_id)
    key = await asyncio.to_thread(projects.revoke_key, db, key_id, project_id)
    await asyncio.to_thread(projects.audit, db, caller, "api_key.revoked", key_id, name=key.name, project_id=project_id)
    return {"object": "organization.project.api_key.deleted", "id": key_id, "deleted": True}


@router.get("/audit_logs")
def list_audit_logs(event_types: list[str] | None = Query(default=None, alias="event_types[]"),
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


MAX_TIME = 2**40  # Unix seconds: far past any usage (and inside a 64-bit column)


def _usage(kind: str, request: Request, db: Database, caller: Caller, start_time: int, end_time: int | None,
           bucket_width: str, limit: int | None, page: str | None, batch: bool | None) -> dict:
    """OpenAI's usage query (arrays as ``project_ids[]=`` or ``project_ids=``): platform admins see every project,
    a project's admin sees its own; members are refused."""
    if not caller.platform_admin and caller.project_role != "admin":
        raise OpenAIError(403, "Usage needs an admin key (of the project, or a platform admin's)",
                          code="project_admin_required")

    def listed(name: str) -> list[str] | None:
        values = request.query_params.getlist(f"{name}[]") + request.query_params.getlist(name)
        return [value[:512] for value in values[:100]] or None

    project_ids = listed("project_ids")
    if not caller.platform_admin:  # a project's admin: its own project, whatever was asked
        project_ids = [caller.project_id]
    return usage_page(db, kind, start_time=start_time, end_time=end_time, bucket_width=bucket_width,
                      group_by=listed("group_by"), project_ids=project_ids, api_key_ids=listed("api_key_ids"),
                      models=listed("models"), batch=batch, limit=limit, page=page)


@router.get("/usage/completions")
def usage_completions(request: Request, start_time: int = Query(ge=0, le=MAX_TIME), end_time: int | None = Query(default=None, ge=0, le=MAX_TIME),
                      bucket_width: str = Query(default="1d", max_length=4), limit: int | None = Query(default=None),
                      page: str | None = Query(default=None, max_length=16), batch: bool | None = None,
                      db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    """Requests, input and output tokens (and vbatch's ``engine_seconds``) of chat, completions and responses,
    batch and online, in buckets of ``1m``, ``1h`` or ``1d``; ``group_by[]`` takes project_id, api_key_id,
    model and batch."""
    return _usage(COMPLETIONS, request, db, caller, start_time, end_time, bucket_width, limit, page, batch)


@router.get("/usage/embeddings")
def usage_embeddings(request: Request, start_time: int = Query(ge=0, le=MAX_TIME), end_time: int | None = Query(default=None, ge=0, le=MAX_TIME),
                     bucket_width: str = Query(default="1d", max_length=4), limit: int | None = Query(default=None),
                     page: str | None = Query(default=None, max_length=16),
                     db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    """Requests and input tokens of embeddings (and score and rerank), as ``/usage/completions``."""
    return _usage(EMBEDDINGS, request, db, caller, start_time, end_time, bucket_width, limit, page, None)


class ReviewerBody(StrictBody):
    email: str = Field(max_length=256, description="the reviewer's address: their Label Studio login")


@router.post("/projects/{project_id}/reviewers")
def add_reviewer(project_id: str, body: ReviewerBody, request: Request, db: Database = Depends(get_db),
                 caller: Caller = Depends(get_caller)) -> dict:
    """vbatch's own: a Label Studio login for a reviewer of the project (its admins and platform admins), in the
    project's own organization there: they see its tasks and no other project's. The password is in the answer,
    that once."""
    _managed_project(db, caller, project_id)
    made = projects.add_reviewer(db, request.app.state.resources.label_studio, project_id, body.email)
    projects.audit(db, caller, "reviewer.added", made["email"], project_id=project_id)
    return made
