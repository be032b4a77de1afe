"""/v1/batches: create (records the batch, then launches its Dagster run), retrieve, list, cancel. Under the
free-space floor a create is refused with 507, and the batches already accepted carry on."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.deps import (
    get_batch_launcher,
    get_caller,
    get_db,
    get_file_store,
    get_model_registry,
    get_settings,
    record,
)
from api.errors import get_or_404
from api.pagination import paginate
from api.routers.files import get_retention_policy
from api.schemas import BatchObject, Page
from resources import FileStore, ModelRegistry, RetentionPolicy
from vbatch_pipelines.batch.service import request_cancel
from vbatch_pipelines.files import expires_after_seconds
from vbatch_pipelines.launch import BatchLauncher
from vbatch_pipelines.projects import Caller
from vbatch_pipelines.retention import require_free_disk
from vbatch_pipelines.settings import Settings
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import Batch
from vbatch_pipelines.submit import accept_batch

router = APIRouter(tags=["batches"])


class CreateBatchRequest(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(default=None)
    output_expires_after: dict[str, Any] | None = Field(
        default=None, description='OpenAI\'s {"anchor": "created_at", "seconds": 3600..2592000}: when the output and '
                                  'error files expire, from their creation (default: VBATCH_FILE_RETENTION_DAYS)')


@router.post("/batches", response_model=BatchObject)
def create(body: CreateBatchRequest, db: Database = Depends(get_db), settings: Settings = Depends(get_settings),
           file_store: FileStore = Depends(get_file_store),
           model_registry: ModelRegistry = Depends(get_model_registry),
           launcher: BatchLauncher = Depends(get_batch_launcher),
           policy: RetentionPolicy = Depends(get_retention_policy), caller: Caller = Depends(get_caller)) -> dict:
    output_expires_after = None
    if body.output_expires_after is not None:
        output_expires_after = expires_after_seconds(body.output_expires_after, "output_expires_after")
    require_free_disk(file_store, policy.min_free_disk_percent, "batches")
    return accept_batch(db, file_store, model_registry, launcher, input_file_id=body.input_file_id,
                        endpoint=body.endpoint, completion_window=body.completion_window, metadata=body.metadata,
                        inline_validation_bytes=settings.api.inline_validation_bytes,
                        output_expires_after=output_expires_after, owner=caller.owner).to_openai()


def _batch_or_404(db: Database, batch_id: str, caller: Caller) -> Batch:
    return get_or_404(db, Batch, batch_id, "batch", "batch_id", caller.project_id)


# The route clients poll. Sync, so it runs in a worker thread: a metadata DB that stalls holds that thread, never
# the event loop (and /health with it); the JSONResponse skips FastAPI's generic encoder (plain JSON already).
@router.get("/batches/{batch_id}", response_class=JSONResponse, response_model=BatchObject)
def retrieve(batch_id: str, db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> JSONResponse:
    return JSONResponse(_batch_or_404(db, batch_id, caller).to_openai())


# Polled by dashboards (a page of 100 batches): returned as built, like ``retrieve``; validating it again
# through the response model cost more than reading it.
@router.get("/batches", response_class=JSONResponse, response_model=Page[BatchObject])
def list_batches(after: str | None = None, limit: int = Query(default=20, ge=1, le=100),
                 db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> JSONResponse:
    with db.session() as session:
        return JSONResponse(paginate(session, Batch, after=after, limit=limit,
                                     where=(Batch.project_id == caller.project_id,)))


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject)
def cancel(batch_id: str, request: Request, db: Database = Depends(get_db),
           caller: Caller = Depends(get_caller)) -> dict:
    _batch_or_404(db, batch_id, caller)
    batch = request_cancel(db, batch_id)
    record(request, "batch.cancelled", batch_id)
    return batch.to_openai()
