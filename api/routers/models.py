"""/v1/models: what vbatch serves (base models, and deployed fine-tunes with their base as ``parent``).
POST installs a base model (vbatch's own); DELETE undeploys a fine-tune (its adapter is unloaded from the
running engine) or removes an installed model."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from api.deps import (
    EnginePool,
    Role,
    caller_role,
    get_caller,
    get_db,
    get_engines,
    get_model_registry,
    get_settings,
    record,
    require_admin,
)
from api.errors import OpenAIError
from api.schemas import Deleted, ModelList, ModelObject, StrictBody
from resources import ModelRegistry
from vbatch_pipelines.models.registry import ModelNotFound, ModelSpec
from vbatch_pipelines.models.store import get_model, remove_model, upsert_model
from vbatch_pipelines.projects import Caller
from vbatch_pipelines.settings import Settings
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.submit import start_install

router = APIRouter(tags=["models"])


def _model_object(spec: ModelSpec, db: Database | None = None) -> dict:
    path = Path(spec.adapter or spec.path)
    created = int(path.stat().st_mtime) if path.exists() else 0
    found = {"id": spec.id, "object": "model", "created": created, "owned_by": "vbatch",
             "root": spec.base.id, "parent": spec.parent}
    row = get_model(db, spec.id) if db is not None and spec.adapter else None
    if row is not None:  # a fine-tune: whose it is, and whether every project may use it
        found.update(owned_by=row.project_id or "vbatch", project_id=row.project_id, shared=row.shared)
    return found


@router.get("/models", response_model=ModelList, response_model_exclude_unset=True)
def list_models(db: Database = Depends(get_db), model_registry: ModelRegistry = Depends(get_model_registry),
                caller: Caller = Depends(get_caller)) -> dict:
    """Base models, and the fine-tunes the caller's project may use (its own and shared ones)."""
    return {"object": "list", "data": [_model_object(spec, db)
                                       for spec in model_registry.served_models(caller.project_id).values()]}


@router.get("/models/{model_id:path}", response_model=ModelObject, response_model_exclude_unset=True)
def retrieve_model(model_id: str, db: Database = Depends(get_db),
                   model_registry: ModelRegistry = Depends(get_model_registry),
                   caller: Caller = Depends(get_caller)) -> dict:
    try:
        return _model_object(model_registry.lookup(model_id, project=caller.project_id), db)
    except ModelNotFound:
        row = get_model(db, model_id)
        if row is not None and row.kind == "base":  # an install under way, or one that failed
            return _store_object(row)
        raise


class InstallModelRequest(StrictBody):
    source: str = Field(description="a Hugging Face repo id (owner/name) or a directory on the vbatch host")
    id: str | None = Field(default=None, description="the name requests will use; default: the source's")
    revision: str | None = Field(default=None, description="branch, tag or commit; pinned to its commit")
    trust_remote_code: bool = False


def _store_object(row) -> dict:
    return {"id": row.id, "object": "model", "created": row.created_at, "owned_by": "vbatch", "root": row.id,
            "parent": None, "status": row.status, "source": row.source, "revision": row.revision,
            "details": row.details}


@router.post("/models", response_model=ModelObject, dependencies=[Depends(require_admin)])
def install_model(body: InstallModelRequest, request: Request, db: Database = Depends(get_db),
                  settings: Settings = Depends(get_settings),
                  model_registry: ModelRegistry = Depends(get_model_registry),
                  engines: EnginePool = Depends(get_engines)) -> dict:
    """vbatch's own, for admins: install a base model. Refused at once when the server's policy does not
    allow the source or remote code, or the model would not fit; otherwise recorded as ``installing`` and
    installed by the installed_model asset."""
    row = start_install(db, model_registry, engines.resource, settings.dagster.url, body.source, model_id=body.id,
                        revision=body.revision, trust_remote_code=body.trust_remote_code)
    record(request, "model.installed", row.id, source=row.source, revision=row.revision,
           trust_remote_code=row.trust_remote_code)
    return _store_object(row)


@router.delete("/models/{model_id:path}", response_model=Deleted)
async def delete_model(model_id: str, request: Request, db: Database = Depends(get_db),
                       model_registry: ModelRegistry = Depends(get_model_registry),
                       engines: EnginePool = Depends(get_engines), role: Role = Depends(caller_role),
                       caller: Caller = Depends(get_caller)) -> dict:
    """Undeploy a fine-tune (its project's keys), or delete an installed base model (admins)."""
    row = await asyncio.to_thread(get_model, db, model_id)
    if row is not None and row.kind == "base":
        await require_admin(role)
    await asyncio.to_thread(remove_model, db, model_registry, engines.resource, model_id, caller.project_id)
    engines.forget(model_id)
    await asyncio.to_thread(record, request, "model.deleted", model_id, kind=row.kind if row else "alias")
    return {"id": model_id, "object": "model", "deleted": True}


class ShareModelRequest(StrictBody):
    shared: bool = Field(description="true: every project may use the fine-tune; false: its own project only")


@router.post("/models/{model_id:path}/share", response_model=ModelObject, response_model_exclude_unset=True)
def share_model(model_id: str, body: ShareModelRequest, request: Request, db: Database = Depends(get_db),
                model_registry: ModelRegistry = Depends(get_model_registry),
                caller: Caller = Depends(get_caller)) -> dict:
    """vbatch's own: serve a fine-tune to every project (or again to its own only). Its project's admins and the
    platform's admins may; another project's fine-tune is a 404 to anyone else."""
    row = get_model(db, model_id)
    if row is None or row.kind != "fine_tune" or not (row.project_id == caller.project_id or caller.platform_admin):
        raise ModelNotFound(model_id, list(model_registry.served_models(caller.project_id)))
    if not caller.may_manage(row.project_id):
        raise OpenAIError(403, f"Sharing a fine-tune takes an admin key of its project; {caller.key_name} is a "
                               "member's", code="project_admin_required")
    upsert_model(db, model_id, shared=body.shared)
    record(request, "model.shared" if body.shared else "model.unshared", model_id, project_id=row.project_id)
    return {**_store_object(get_model(db, model_id)), "root": row.parent, "parent": row.parent,
            "project_id": row.project_id, "shared": body.shared}
