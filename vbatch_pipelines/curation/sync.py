"""Reading reviews back from Label Studio: one code path for the sensor, the webhook and the API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vbatch_pipelines.curation.schemas import get_schema, read_annotation
from vbatch_pipelines.curation.service import AnnotationReview, apply_reviews, get_task
from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.store.db import Database


def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def live_annotations(annotations: list[Any]) -> list[Any]:
    """The annotations that count: those not skipped."""
    return [a for a in annotations or [] if not _field(a, "was_cancelled", False) and _field(a, "id") is not None]


def as_review(annotation: Any, names: Callable[[str], str] = str) -> AnnotationReview:
    """``names``: a reviewer's name (their email) from the user id Label Studio gives."""
    who = reviewer_of(annotation)
    return AnnotationReview(int(_field(annotation, "id")), names(who) if who and "@" not in who else who or "unknown",
                            read_annotation(_field(annotation, "result") or []),
                            utc_stamp(_field(annotation, "updated_at")))


def record_annotation(db: Database, task_id: int, annotation: Any, *, only_if_newer: bool = False,
                      names: Callable[[str], str] = str) -> bool:
    """Record one annotation of a task (created or updated; a skipped one is forgotten); True when the task's
    review changed. ``only_if_newer``: ``annotation`` comes from an event, ignored when older than the one
    recorded."""
    if _field(annotation, "was_cancelled", False):
        return apply_reviews(db, task_id, (), removed=[int(_field(annotation, "id"))])
    return apply_reviews(db, task_id, [as_review(annotation, names)], only_if_newer=only_if_newer)


def utc_stamp(value: Any) -> str | None:
    """Label Studio's updated_at (a datetime or an ISO string, any offset) as a sortable UTC ISO string."""
    from datetime import datetime, timezone

    if value in (None, ""):
        return None
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def reviewer_of(annotation: Any) -> str | None:
    """Who made an annotation: Label Studio gives the user's id (or, nested, the user with an email)."""
    who = _field(annotation, "completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return None if who is None else str(who)


def record_task(db: Database, task: Any, names: Callable[[str], str] = str) -> bool:
    """A task as Label Studio lists it, with every annotation: the listing is the truth."""
    return apply_reviews(db, int(_field(task, "id")),
                         [as_review(a, names) for a in live_annotations(_field(task, "annotations") or [])],
                         complete=True)


def write_through(db: Database, label_studio: Any, task: Any, *, answer: str | None, rating: int | None,
                  gold_star: bool) -> bool:
    """A review made through vbatch (its API, its review page, an extension), written into Label Studio as an
    annotation and then recorded, so both show the same; True when the task's review changed. With one
    annotation wanted per task the task's current annotation is updated (an expert's edit and rating kept);
    with several, vbatch's own (its Label Studio user is one reviewer among them)."""
    from sqlalchemy import select

    from vbatch_pipelines.store.models import CurationReview, Project

    project = db.get(Project, task.project_id)
    annotation_id = task.annotation_id
    if project is not None and project.review_annotations > 1:
        me = label_studio.own_reviewer()
        with db.session() as session:
            annotation_id = session.scalars(select(CurationReview.annotation_id).where(
                CurationReview.ls_task_id == task.ls_task_id, CurationReview.reviewer == me)).first()
    annotation = label_studio.write_review(task.ls_task_id, answer, rating, gold_star, annotation_id)
    return record_annotation(db, task.ls_task_id, annotation, names=label_studio.reviewer_name)


class InvalidReview(VbatchError):
    code = "invalid_response"


def review_task(db: Database, label_studio: Any, task: Any, *, response: str | None = None,
                rating: int | None = None, gold_star: bool | None = None) -> bool:
    """One task's review made through vbatch (the API, the review page): the fields given are set, the rest keep
    what the task has; True when its review changed. Written as the task's project's organization. When vbatch has
    recorded no review yet, Label Studio's current one (an expert's, not yet brought by the sensor or the webhook)
    is recorded first, so this one updates that annotation and keeps its edit and rating. An answer invalid for
    the task's schema: InvalidReview, nothing written."""
    if response is not None:
        problem = get_schema(task.schema).validate(response)
        if problem:
            raise InvalidReview(f"response is {problem}", "response")
    label_studio = label_studio.for_project(task.project_id)
    changed = False
    if task.annotation_id is None:
        changed = record_task(db, label_studio.task(task.ls_task_id), label_studio.reviewer_name)
        task = get_task(db, task.ls_task_id)
    return write_through(db, label_studio, task,
                         answer=response if response is not None else task.edited_response,
                         rating=rating if rating is not None else task.rating,
                         gold_star=gold_star if gold_star is not None else task.gold_star) or changed
