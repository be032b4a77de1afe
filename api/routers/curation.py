"""Curation through vbatch: gold stars and edits written through to Label Studio, the webhook receiver,
stats, and the gold-star datasets with their exports."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Literal

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
    Page,
    StrictBody,
    WebhookReceipt,
)
from resources import LabelStudio
from vbatch_pipelines.curation.dataset import export_filename, export_path
from vbatch_pipelines.curation.service import (
    MAX_PAGE,
    assign_tasks,
    clear_annotations,
    get_task,
    list_tasks,
    project_tasks,
    ready_datasets,
    stats,
    with_reviews,
)
from vbatch_pipelines.curation.sync import record_annotation, review_task
from vbatch_pipelines.projects import Caller, audit
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


class ReviewRequest(StrictBody):
    """A review made in vbatch (its review page): the fields given are set, the rest kept."""

    response: str | None = Field(default=None, min_length=1, description="the corrected answer")
    rating: int | None = Field(default=None, ge=1, le=5)
    gold_star: bool | None = None


MAX_BULK = 500
TaskIds = Field(min_length=1, max_length=MAX_BULK, description=f"Label Studio task ids (at most {MAX_BULK})")


class BulkGoldStarRequest(StrictBody):
    task_ids: list[Annotated[int, Field(ge=1, le=2**31 - 1)]] = TaskIds
    gold_star: bool = True


class AssignRequest(StrictBody):
    task_ids: list[Annotated[int, Field(ge=1, le=2**31 - 1)]] = TaskIds
    reviewers: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        min_length=1, max_length=50, description="reviewers (their Label Studio emails), shared out round robin")


def _task_or_404(db: Database, task_id: int, caller: Caller):
    task = of_project(get_task(db, task_id), caller.project_id)
    if task is None:
        raise not_found("curation task", str(task_id), param="task_id")
    return task


def task_page(data: list[dict], has_more: bool = False) -> dict:
    """Tasks as a list page (ids as strings, as ``Page`` has them)."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": str(data[0]["id"]) if data else None, "last_id": str(data[-1]["id"]) if data else None}


def _shown(db: Database, task_id: int, caller: Caller) -> dict:
    return with_reviews(db, [_task_or_404(db, task_id, caller)])[0]


async def notify_reviews(request: Request, task_ids: list[int]) -> None:
    """Tell the extensions (e.g. Aris) which tasks' reviews changed; they act on them at once."""
    for listener in request.app.state.review_listeners:
        if task_ids:
            await asyncio.to_thread(listener, request.app.state.resources, task_ids)


def _review(label_studio: LabelStudio, db: Database, task_id: int, caller: Caller, **review) -> bool:
    """Write one task's review through to Label Studio, then record it (``review_task``); Label Studio down: a 503
    and nothing changed."""
    return review_task(db, label_studio, _task_or_404(db, task_id, caller), **review)


async def review_and_tell(request: Request, label_studio: LabelStudio, db: Database, task_id: int, caller: Caller,
                          event: str, **review) -> dict:
    """One review (the API's routes, the review page): written through, the extensions told, the audit log
    written; the task as shown after it."""
    if await asyncio.to_thread(lambda: _review(label_studio, db, task_id, caller, **review)):
        await notify_reviews(request, [task_id])
    details = {"characters": len(review["response"])} if review.get("response") is not None else {}
    await asyncio.to_thread(audit, db, caller, event, str(task_id), **details)
    return await asyncio.to_thread(_shown, db, task_id, caller)


async def star_many(request: Request, label_studio: LabelStudio, db: Database, caller: Caller, task_ids: list[int],
                    gold_star: bool) -> list[dict]:
    """Star (or unstar) many tasks, each as one review. Every id is checked first (an unknown one: NotFound and
    nothing changed); Label Studio failing midway: a 503, the tasks written before it stay written."""
    task_ids = list(dict.fromkeys(task_ids))
    await asyncio.to_thread(project_tasks, db, caller.project_id, task_ids)
    changed: list[int] = []
    try:
        for task_id in task_ids:
            if await asyncio.to_thread(lambda t=task_id: _review(label_studio, db, t, caller, gold_star=gold_star)):
                changed.append(task_id)
    finally:
        await notify_reviews(request, changed)
        if changed:
            await asyncio.to_thread(audit, db, caller, "curation.starred" if gold_star else "curation.unstarred",
                                    ",".join(map(str, changed))[:256], tasks=len(changed))
    return await asyncio.to_thread(lambda: with_reviews(db, project_tasks(db, caller.project_id, task_ids)))


@router.get("/curation/tasks", response_model=Page[CurationTaskObject])
def list_curation_tasks(
        batch_id: str | None = Query(default=None, max_length=64),
        schema: str | None = Query(default=None, max_length=64, description="one task schema"),
        gold_star: bool | None = None,
        reviewed: bool | None = Query(default=None, description="its review is complete (as many reviewers as the "
                                      "project wants); with assignee: that reviewer has reviewed it"),
        assignee: str | None = Query(default=None, max_length=256, description="tasks handed to this reviewer"),
        after: int | None = Query(default=None, ge=0, le=2**31 - 1, description="the last task id of the page before"),
        limit: int = Query(default=20, ge=1, le=MAX_PAGE),
        db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    """The project's review queue, oldest task first, filtered and paged (vbatch's own)."""
    data, has_more = list_tasks(db, caller.project_id, batch_id=batch_id, schema=schema, gold_star=gold_star,
                                reviewed=reviewed, assignee=assignee, after=after, limit=limit)
    return task_page(data, has_more)


@router.post("/curation/tasks/gold-star", response_model=Page[CurationTaskObject])
async def bulk_gold_star(body: BulkGoldStarRequest, request: Request, db: Database = Depends(get_db),
                         label_studio: LabelStudio = Depends(get_label_studio),
                         caller: Caller = Depends(get_caller)) -> dict:
    """Star (or unstar) many tasks at once, each written through to Label Studio as for one task. Every id is
    checked first (an unknown one: a 404 and nothing changed); Label Studio failing midway: a 503, the tasks
    written before it stay written (the response names none; list them to see)."""
    return task_page(await star_many(request, label_studio, db, caller, body.task_ids, body.gold_star))


@router.post("/curation/tasks/assign", response_model=Page[CurationTaskObject])
def assign(body: AssignRequest, request: Request, db: Database = Depends(get_db),
           caller: Caller = Depends(get_caller)) -> dict:
    """Hand tasks to reviewers (vbatch's own queue; Label Studio Community has no assignment): each task to as many
    of them as the project wants annotations, round robin. A project admin's call."""
    if not caller.may_manage(caller.project_id):
        raise OpenAIError(403, "Assigning review tasks needs an admin key of this project",
                          code="project_admin_required")
    task_ids = list(dict.fromkeys(body.task_ids))
    assign_tasks(db, caller.project_id, task_ids, list(dict.fromkeys(body.reviewers)))
    record(request, "curation.assigned", ",".join(map(str, task_ids))[:256], reviewers=body.reviewers)
    return task_page(with_reviews(db, project_tasks(db, caller.project_id, task_ids)))


@router.get("/curation/tasks/{task_id}", response_model=CurationTaskObject)
def retrieve_task(task_id: int = TaskId, db: Database = Depends(get_db),
                  caller: Caller = Depends(get_caller)) -> dict:
    return _shown(db, task_id, caller)


@router.patch("/curation/tasks/{task_id}", response_model=CurationTaskObject)
async def patch_task(body: ReviewRequest, request: Request, task_id: int = TaskId, db: Database = Depends(get_db),
                     label_studio: LabelStudio = Depends(get_label_studio),
                     caller: Caller = Depends(get_caller)) -> dict:
    """A review in one call (the review page's): corrected answer, rating, gold star; written through to Label
    Studio."""
    return await review_and_tell(request, label_studio, db, task_id, caller, "curation.reviewed",
                           **body.model_dump(exclude_none=True))


@router.post("/curation/tasks/{task_id}/gold-star", response_model=CurationTaskObject)
async def set_gold_star(request: Request, task_id: int = TaskId, body: GoldStarRequest | None = None,
                        db: Database = Depends(get_db), label_studio: LabelStudio = Depends(get_label_studio),
                        caller: Caller = Depends(get_caller)) -> dict:
    """Mark (or with ``{"gold_star": false}`` unmark) a result as a gold star, in Label Studio too."""
    starred = (body or GoldStarRequest()).gold_star
    return await review_and_tell(request, label_studio, db, task_id, caller,
                           "curation.starred" if starred else "curation.unstarred", gold_star=starred)


@router.patch("/curation/tasks/{task_id}/response", response_model=CurationTaskObject)
async def edit_response(body: EditRequest, request: Request, task_id: int = TaskId, db: Database = Depends(get_db),
                        label_studio: LabelStudio = Depends(get_label_studio),
                        caller: Caller = Depends(get_caller)) -> dict:
    """Replace the model's answer with an expert's (validated by the task's schema), in Label Studio too."""
    return await review_and_tell(request, label_studio, db, task_id, caller, "curation.edited", response=body.response)


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


def _names_for(label_studio: LabelStudio, db: Database, task_id: int):
    """Reviewer names (emails) as the task's project's organization knows them."""
    task = get_task(db, task_id)
    return label_studio.for_project(task.project_id).reviewer_name if task is not None else str


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
        if "id" in task and "id" in annotation and await asyncio.to_thread(
                lambda: record_annotation(db, int(task["id"]), annotation, only_if_newer=True,
                                          names=_names_for(label_studio, db, int(task["id"])))):
            changed.append(int(task["id"]))
    elif action == "ANNOTATIONS_DELETED":
        ids = [int(a["id"]) for a in payload.get("annotations") or [] if "id" in a]
        changed = await asyncio.to_thread(clear_annotations, db, ids)
    await notify_reviews(request, changed)
    return JSONResponse({"received": action, "changed_tasks": changed})
