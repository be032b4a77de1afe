"""Curation through vbatch: gold stars and edits written through to Label Studio, the webhook receiver,
stats, and the gold-star datasets with their exports."""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import Field

from api.deps import get_caller, get_db, get_label_studio, get_label_studio_resource, record, same_secret
from api.errors import OpenAIError, get_or_404, not_found
from api.schemas import (
    DATASET_DOWNLOAD,
    CurationStats,
    CurationTaskObject,
    DatasetList,
    DatasetObject,
    StrictBody,
    WebhookReceipt,
)
from resources import LabelStudio
from vbatch_pipelines.curation.dataset import export_filename, export_path
from vbatch_pipelines.curation.schemas import get_schema
from vbatch_pipelines.curation.service import clear_annotations, get_task, ready_datasets, stats
from vbatch_pipelines.curation.sync import record_annotation, record_task
from vbatch_pipelines.projects import Caller
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import Dataset, of_project

log = logging.getLogger("vbatch.api")
router = APIRouter(tags=["curation"])
# Label Studio task ids: positive 32-bit integers.
TaskId = Path(ge=1, le=2**31 - 1, description="the Label Studio task id")
webhooks = APIRouter(tags=["curation"])


class GoldStarRequest(StrictBody):
    gold_star: bool = True


class EditRequest(StrictBody):
    response: str = Field(min_length=1)


def _task_or_404(db: Database, task_id: int, caller: Caller):
    task = of_project(get_task(db, task_id), caller.project_id)
    if task is None:
        raise not_found("curation task", str(task_id), param="task_id")
    return task


async def notify_reviews(request: Request, task_ids: list[int]) -> None:
    """Tell the extensions (e.g. Aris) which tasks' reviews changed; they act on them at once."""
    for listener in request.app.state.review_listeners:
        if task_ids:
            await asyncio.to_thread(listener, request.app.state.resources, task_ids)


async def _write_review(request: Request, label_studio: LabelStudio, db: Database, task_id: int, caller: Caller, *,
                        answer: str | None, gold_star: bool) -> dict:
    """Write the review to Label Studio (as the task's project's organization), then record it; Label Studio
    down: a 503 and nothing changed."""
    task = await asyncio.to_thread(_task_or_404, db, task_id, caller)
    label_studio = label_studio.for_project(task.project_id)

    def write() -> bool:
        annotation = label_studio.write_review(task_id, answer, task.rating, gold_star, task.annotation_id)
        return record_annotation(db, task_id, annotation)

    if await asyncio.to_thread(write):
        await notify_reviews(request, [task_id])
    return (await asyncio.to_thread(_task_or_404, db, task_id, caller)).to_api()


async def _reviewed_task(request: Request, label_studio: LabelStudio, db: Database, task_id: int, caller: Caller):
    """The task as vbatch knows it. When it has recorded no review yet, Label Studio's current one (an expert's,
    not yet brought by the sensor or the webhook) is recorded first, so a review written here updates that
    annotation and keeps its edit and rating instead of adding a second annotation."""
    task = await asyncio.to_thread(_task_or_404, db, task_id, caller)
    if task.annotation_id is not None:
        return task
    label_studio = label_studio.for_project(task.project_id)
    if await asyncio.to_thread(lambda: record_task(db, label_studio.task(task_id))):
        await notify_reviews(request, [task_id])
    return await asyncio.to_thread(_task_or_404, db, task_id, caller)


@router.get("/curation/tasks/{task_id}", response_model=CurationTaskObject)
def retrieve_task(task_id: int = TaskId, db: Database = Depends(get_db),
                  caller: Caller = Depends(get_caller)) -> dict:
    return _task_or_404(db, task_id, caller).to_api()


@router.post("/curation/tasks/{task_id}/gold-star", response_model=CurationTaskObject)
async def set_gold_star(request: Request, task_id: int = TaskId, body: GoldStarRequest | None = None,
                        db: Database = Depends(get_db), label_studio: LabelStudio = Depends(get_label_studio),
                        caller: Caller = Depends(get_caller)) -> dict:
    """Mark (or with ``{"gold_star": false}`` unmark) a result as a gold star, in Label Studio too."""
    task = await _reviewed_task(request, label_studio, db, task_id, caller)
    starred = (body or GoldStarRequest()).gold_star
    written = await _write_review(request, label_studio, db, task_id, caller, answer=task.edited_response,
                                  gold_star=starred)
    await asyncio.to_thread(record, request, "curation.starred" if starred else "curation.unstarred", str(task_id))
    return written


@router.patch("/curation/tasks/{task_id}/response", response_model=CurationTaskObject)
async def edit_response(body: EditRequest, request: Request, task_id: int = TaskId, db: Database = Depends(get_db),
                        label_studio: LabelStudio = Depends(get_label_studio),
                        caller: Caller = Depends(get_caller)) -> dict:
    """Replace the model's answer with an expert's (validated by the task's schema), in Label Studio too."""
    problem = get_schema(_task_or_404(db, task_id, caller).schema).validate(body.response)
    if problem:
        raise OpenAIError(400, f"response is {problem}", param="response", code="invalid_response")
    task = await _reviewed_task(request, label_studio, db, task_id, caller)
    written = await _write_review(request, label_studio, db, task_id, caller, answer=body.response,
                                  gold_star=task.gold_star)
    await asyncio.to_thread(record, request, "curation.edited", str(task_id), characters=len(body.response))
    return written


@router.get("/curation/stats", response_model=CurationStats)
def curation_stats(db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    return stats(db, caller.project_id)


@router.get("/datasets", response_model=DatasetList)
def list_datasets(limit: int = Query(default=20, ge=1, le=100),
                  kind: Literal["sft", "preference"] | None = Query(default=None, description="one kind only"),
                  db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    """Both kinds of dataset version, newest first: gold stars (sft) and preference pairs."""
    with db.session() as session:
        rows = list(session.scalars(ready_datasets(caller.project_id, kind).limit(limit + 1)))
    data = [row.to_api() for row in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit}


def _dataset_or_404(db: Database, version: str, caller: Caller) -> Dataset:
    dataset = get_or_404(db, Dataset, version, "dataset", "version", caller.project_id)
    if dataset.status != "ready":  # claimed by a build still writing it
        raise not_found("dataset", version, "version")
    return dataset


@router.get("/datasets/{version}", response_model=DatasetObject)
def retrieve_dataset(version: str, db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    return _dataset_or_404(db, version, caller).to_api()


@router.get("/datasets/{version}/export", response_class=FileResponse, responses=DATASET_DOWNLOAD)
def export_dataset(version: str, format: str = "openai", split: str = "train",
                   db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> FileResponse:
    dataset = _dataset_or_404(db, version, caller)
    path = export_path(dataset, format, split)
    return FileResponse(path, filename=export_filename(dataset, path),
                        media_type="application/jsonl" if path.suffix == ".jsonl" else "application/json")


@webhooks.post("/webhooks/label-studio", include_in_schema=False, response_model=WebhookReceipt)
async def label_studio_webhook(request: Request, db: Database = Depends(get_db),
                               label_studio: LabelStudio = Depends(get_label_studio_resource),
                               x_vbatch_webhook_secret: str | None = Header(default=None)) -> JSONResponse:
    """Annotation events from Label Studio, recorded at once (the sensor reads the same changes later;
    recording is idempotent)."""
    expected = label_studio.shared_webhook_secret()
    if not x_vbatch_webhook_secret or not expected or not same_secret(x_vbatch_webhook_secret, expected):
        log.warning("refused a Label Studio webhook from %s: %s X-Vbatch-Webhook-Secret",
                    request.client.host if request.client else "?", "wrong" if x_vbatch_webhook_secret else "no")
        raise OpenAIError(401, "Missing or wrong X-Vbatch-Webhook-Secret", code="invalid_webhook_secret")
    try:
        payload = await request.json()
    except ValueError as exc:
        raise OpenAIError(400, "The webhook body is not JSON") from exc
    action = payload.get("action")
    changed: list[int] = []
    if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        task, annotation = payload.get("task") or {}, payload.get("annotation") or {}
        # Events may come late or twice (Label Studio retries): never let an older one overwrite a newer review.
        if "id" in task and await asyncio.to_thread(record_annotation, db, int(task["id"]), annotation,
                                                    only_if_newer=True):
            changed.append(int(task["id"]))
    elif action == "ANNOTATIONS_DELETED":
        ids = [int(a["id"]) for a in payload.get("annotations") or [] if "id" in a]
        changed = await asyncio.to_thread(clear_annotations, db, ids)
    await notify_reviews(request, changed)
    return JSONResponse({"received": action, "changed_tasks": changed})
