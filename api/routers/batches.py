"""/v1/batches: create (records the batch, then launches its Dagster run), retrieve, list, cancel."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.deps import get_batch_launcher, get_db, get_file_store, get_model_registry, get_settings
from api.errors import get_or_404
from api.pagination import paginate
from api.schemas import BatchObject, Page
from resources import FileStore, ModelRegistry
from vbatch_pipelines.batch.service import (
    BatchRequestError,
    create_batch,
    get_batch,
    request_cancel,
    validate_input,
)
from vbatch_pipelines.files import get_file
from vbatch_pipelines.launch import BatchLauncher
from vbatch_pipelines.settings import Settings
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import Batch

router = APIRouter(tags=["batches"])
log = logging.getLogger("vbatch.api")


class CreateBatchRequest(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(default=None)


@router.post("/batches", response_model=BatchObject)
def create(body: CreateBatchRequest, db: Database = Depends(get_db), settings: Settings = Depends(get_settings),
           file_store: FileStore = Depends(get_file_store),
           model_registry: ModelRegistry = Depends(get_model_registry),
           launcher: BatchLauncher = Depends(get_batch_launcher)) -> dict:
    return accept_batch(db, settings, file_store, model_registry, launcher, input_file_id=body.input_file_id,
                        endpoint=body.endpoint, completion_window=body.completion_window,
                        metadata=body.metadata).to_openai()


def accept_batch(db: Database, settings: Settings, file_store: FileStore, model_registry: ModelRegistry,
                 launcher: BatchLauncher, *, input_file_id: str, endpoint: str, completion_window: str = "24h",
                 metadata: dict[str, str] | None = None) -> Batch:
    """Record a batch and have it launched (the API's create and the console's form)."""
    batch = create_batch(db, input_file_id=input_file_id, endpoint=endpoint, completion_window=completion_window,
                         metadata=metadata)
    input_file = get_file(db, batch.input_file_id)
    inline = input_file is not None and input_file.bytes <= settings.inline_validation_bytes
    if inline:
        # Fast path: a small file (under a second for 8 MiB) is validated here, so the batch is in_progress (or
        # failed, with its line errors) when this returns; batch_input then only records the result.
        # Larger files stay `validating` until batch_input streams them.
        try:
            if not validate_input(db, batch, file_store.batch_dir(batch.id), model_registry.served_id).ok:
                return get_batch(db, batch.id)
        except BatchRequestError as exc:  # the file vanished meanwhile: batch_input reports it
            log.warning("batch %s: inline validation skipped: %s", batch.id, exc)
    # In the background, with every batch recorded meanwhile: concurrent creates share a run.
    launcher.launch(batch.id, validated=inline)
    return get_batch(db, batch.id) or batch


def _batch_or_404(db: Database, batch_id: str) -> Batch:
    return get_or_404(db, Batch, batch_id, "batch", "batch_id")


# The route clients poll. Async: a metadata-DB read by key takes ~0.1 ms, less than the thread hand-off
# a sync route costs; the JSONResponse skips FastAPI's generic encoder (the object is plain JSON already).
@router.get("/batches/{batch_id}", response_class=JSONResponse, response_model=BatchObject)
async def retrieve(batch_id: str, db: Database = Depends(get_db)) -> JSONResponse:
    return JSONResponse(_batch_or_404(db, batch_id).to_openai())


# Polled by dashboards (a page of 100 batches): returned as built, like ``retrieve``; validating it again
# through the response model cost more than reading it.
@router.get("/batches", response_class=JSONResponse, response_model=Page[BatchObject])
async def list_batches(after: str | None = None, limit: int = Query(default=20, ge=1, le=100),
                       db: Database = Depends(get_db)) -> JSONResponse:
    with db.session() as session:
        return JSONResponse(paginate(session, Batch, after=after, limit=limit))


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject)
def cancel(batch_id: str, db: Database = Depends(get_db)) -> dict:
    _batch_or_404(db, batch_id)
    return request_cancel(db, batch_id).to_openai()
