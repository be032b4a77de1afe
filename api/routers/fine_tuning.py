"""/v1/fine_tuning/jobs: OpenAI's fine-tuning API on the local trainer. Create checks the training data
(bad data is refused with line numbers, never queued), records the job and launches its Dagster run."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from api.deps import (
    EnginePool,
    get_caller,
    get_db,
    get_engines,
    get_file_store,
    get_model_registry,
    get_settings,
    get_trainer,
    record,
)
from api.errors import OpenAIError, get_or_404
from api.pagination import paginate
from api.schemas import (
    FineTuningCheckpointObject,
    FineTuningComparison,
    FineTuningEventObject,
    FineTuningJobObject,
    Page,
)
from resources import FileStore, ModelRegistry, Trainer
from vbatch_pipelines.curation.filters import DatasetFilter
from vbatch_pipelines.fine_tuning.service import (
    cancel_job,
    deploy_on_request,
    list_checkpoints,
    list_events,
)
from vbatch_pipelines.projects import Caller
from vbatch_pipelines.settings import Settings
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import FineTuningJob
from vbatch_pipelines.submit import start_fine_tune

router = APIRouter(tags=["fine-tuning"])


class MethodSettings(BaseModel):
    """``method.supervised`` or ``method.dpo``: the method's hyperparameters."""

    model_config = ConfigDict(extra="forbid")
    hyperparameters: dict[str, Any] | None = None


class Method(BaseModel):
    """OpenAI's ``method``: supervised fine-tuning on chat examples, or DPO on preference pairs."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: MethodSettings | None = None
    dpo: MethodSettings | None = None


class CreateFineTuningJobRequest(BaseModel):
    model: str
    training_file: str = Field(description="a file id (purpose fine-tune) or a dataset version, e.g. v3: gold stars "
                                           "for a supervised job, preference pairs for a DPO one")
    validation_file: str | None = None
    hyperparameters: dict[str, Any] | None = None
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: Method | None = None
    integrations: list[dict[str, Any]] | None = None
    dataset_filter: DatasetFilter | None = Field(default=None, description="vbatch's own: with a gold-star dataset "
                                                 "version, train on the examples that match only (schema, model, "
                                                 "batch metadata, reviewer, minimum rating, agreement)")


def _hyperparameters(body: CreateFineTuningJobRequest) -> dict[str, Any] | None:
    method = body.method or Method()
    other = "dpo" if method.type == "supervised" else "supervised"
    if getattr(method, other) is not None:
        raise OpenAIError(400, f"method.{other} is given but method.type is {method.type!r}", param=f"method.{other}")
    settings = getattr(method, method.type)
    from_method = settings.hyperparameters if settings is not None else None
    if from_method is not None and body.hyperparameters is not None:
        raise OpenAIError(400, f"Give hyperparameters either at the top level or in method.{method.type}, not both",
                          param="hyperparameters")
    return from_method if from_method is not None else body.hyperparameters


@router.post("/fine_tuning/jobs", response_model=FineTuningJobObject)
def create(body: CreateFineTuningJobRequest, db: Database = Depends(get_db),
           settings: Settings = Depends(get_settings), model_registry: ModelRegistry = Depends(get_model_registry),
           file_store: FileStore = Depends(get_file_store), trainer: Trainer = Depends(get_trainer),
           caller: Caller = Depends(get_caller)) -> dict:
    if body.integrations:
        raise OpenAIError(400, "integrations are not supported here; training metrics are in the job's events "
                               "and in Dagster", param="integrations")
    return start_fine_tune(db, model_registry, file_store, trainer, settings.dagster.url, model=body.model,
                           training_file=body.training_file, validation_file=body.validation_file,
                           hyperparameters=_hyperparameters(body), suffix=body.suffix, seed=body.seed,
                           metadata=body.metadata, owner=caller.owner,
                           method=body.method.type if body.method else "supervised",
                           dataset_filter=body.dataset_filter).to_openai()


def _job_or_404(db: Database, job_id: str, caller: Caller) -> FineTuningJob:
    return get_or_404(db, FineTuningJob, job_id, "fine_tuning_job", "fine_tuning_job_id", caller.project_id)


@router.get("/fine_tuning/jobs", response_model=Page[FineTuningJobObject])
def list_jobs(request: Request, after: str | None = None, limit: int = Query(default=20, ge=1, le=100),
              db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    # OpenAI's SDK sends a metadata filter as metadata[key]=value
    where = [FineTuningJob.project_id == caller.project_id,
             *(FineTuningJob.metadata_[key[9:-1]].as_string() == value for key, value in request.query_params.items()
               if key.startswith("metadata[") and key.endswith("]"))]
    with db.session() as session:
        return paginate(session, FineTuningJob, after=after, limit=limit, where=where)


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJobObject)
def retrieve(job_id: str, db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    return _job_or_404(db, job_id, caller).to_openai()


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJobObject)
def cancel(job_id: str, db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    _job_or_404(db, job_id, caller)
    return cancel_job(db, job_id).to_openai()


@router.post("/fine_tuning/jobs/{job_id}/deploy", response_model=FineTuningJobObject)
async def deploy(job_id: str, request: Request, db: Database = Depends(get_db),
                 model_registry: ModelRegistry = Depends(get_model_registry),
                 engines: EnginePool = Depends(get_engines), caller: Caller = Depends(get_caller)) -> dict:
    """vbatch's own: serve a succeeded job's fine-tune now — one the deploy gate held back, or one undeployed
    since — on its base model's warm engine, without a restart."""
    job = await asyncio.to_thread(_job_or_404, db, job_id, caller)
    await asyncio.to_thread(deploy_on_request, db, model_registry, engines.resource, job)
    job = await asyncio.to_thread(_job_or_404, db, job_id, caller)
    await asyncio.to_thread(record, request, "fine_tune.deployed", job_id, model=job.fine_tuned_model)
    return job.to_openai()


def _page(list_fn, db: Database, job_id: str, after: str | None, limit: int, caller: Caller) -> dict:
    _job_or_404(db, job_id, caller)
    items, has_more = list_fn(db, job_id, after=after, limit=limit)
    data = [item.to_openai() for item in items]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=Page[FineTuningEventObject])
def events(job_id: str, after: str | None = None, limit: int = Query(default=20, ge=1, le=100),
           db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    return _page(list_events, db, job_id, after, limit, caller)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=Page[FineTuningCheckpointObject])
def checkpoints(job_id: str, after: str | None = None, limit: int = Query(default=10, ge=1, le=100),
                db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    return _page(list_checkpoints, db, job_id, after, limit, caller)


@router.get("/fine_tuning/jobs/{job_id}/comparison", response_model=FineTuningComparison)
def comparison(job_id: str, db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    """vbatch's own: base vs fine-tuned on the held-out examples (model_comparison's table)."""
    job = _job_or_404(db, job_id, caller)
    if job.comparison is None:
        raise OpenAIError(404, f"Job {job_id} has no comparison yet (status {job.status})", param="fine_tuning_job_id",
                          code="comparison_not_found")
    return {"object": "fine_tuning.job.comparison", "fine_tuning_job_id": job_id, **job.comparison}
