"""/v1/models: what vbatch serves (base models, and deployed fine-tunes with their base as ``parent``).
POST installs a base model (vbatch's own); DELETE undeploys a fine-tune (its adapter is unloaded from the
running engine) or removes an installed model."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from api.deps import (
    EnginePool,
    Role,
    caller_role,
    get_db,
    get_engines,
    get_model_registry,
    get_settings,
    record,
    require_admin,
)
from api.schemas import Deleted, ModelList, ModelObject
from resources import ModelRegistry
from vbatch_pipelines.models.registry import ModelNotFound, ModelSpec
from vbatch_pipelines.models.store import get_model, remove_model
from vbatch_pipelines.settings import Settings
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.submit import start_install

router = APIRouter(tags=["models"])


def _model_object(spec: ModelSpec) -> dict:
    path = Path(spec.adapter or spec.path)
    created = int(path.stat().st_mtime) if path.exists() else 0
    return {"id": spec.id, "object": "model", "created": created, "owned_by": "vbatch",
            "root": spec.base.id, "parent": spec.parent}


@router.get("/models", response_model=ModelList, response_model_exclude_unset=True)
def list_models(model_registry: ModelRegistry = Depends(get_model_registry)) -> dict:
    return {"object": "list", "data": [_model_object(spec) for spec in model_registry.served_models().values()]}


@router.get("/models/{model_id:path}", response_model=ModelObject, response_model_exclude_unset=True)
def retrieve_model(model_id: str, db: Database = Depends(get_db),
                   model_registry: ModelRegistry = Depends(get_model_registry)) -> dict:
    try:
        return _model_object(model_registry.lookup(model_id))
    except ModelNotFound:
        row = get_model(db, model_id)
        if row is not None and row.kind == "base":  # an install under way, or one that failed
            return _store_object(row)
        raise


class InstallModelRequest(BaseModel):
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
    row = start_install(db, model_registry, engines.resource, settings.dagster_url, body.source, model_id=body.id,
                        revision=body.revision, trust_remote_code=body.trust_remote_code)
    record(request, "model.installed", row.id, source=row.source, revision=row.revision,
           trust_remote_code=row.trust_remote_code)
    return _store_object(row)


@router.delete("/models/{model_id:path}", response_model=Deleted)
async def delete_model(model_id: str, request: Request, db: Database = Depends(get_db),
                       model_registry: ModelRegistry = Depends(get_model_registry),
                       engines: EnginePool = Depends(get_engines), role: Role = Depends(caller_role)) -> dict:
    """Undeploy a fine-tune (any key), or delete an installed base model (admins)."""
    row = get_model(db, model_id)
    if row is not None and row.kind == "base":
        await require_admin(role)
    await asyncio.to_thread(remove_model, db, model_registry, engines.resource, model_id)
    engines.forget(model_id)
    await asyncio.to_thread(record, request, "model.deleted", model_id, kind=row.kind if row else "alias")
    return {"id": model_id, "object": "model", "deleted": True}
