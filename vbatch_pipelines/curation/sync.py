"""Reading reviews back from Label Studio: one code path for the sensor, the webhook and the API."""

from __future__ import annotations

from typing import Any

from vbatch_pipelines.curation.schemas import Review, read_annotation
from vbatch_pipelines.curation.service import apply_review
from vbatch_pipelines.store.db import Database


def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def current_annotation(annotations: list[Any]) -> Any | None:
    """The annotation that counts: the most recently updated one that was not skipped."""
    live = [a for a in annotations or [] if not _field(a, "was_cancelled", False)]
    if not live:
        return None
    return max(live, key=lambda a: (str(_field(a, "updated_at") or ""), _field(a, "id") or 0))


def record_annotation(db: Database, task_id: int, annotation: Any | None) -> bool:
    """Record a task's current annotation (None: it has none); True when the DB changed."""
    if annotation is None:
        return apply_review(db, task_id, None, None)
    review: Review = read_annotation(_field(annotation, "result") or [])
    return apply_review(db, task_id, review, _field(annotation, "id"), reviewer_of(annotation))


def reviewer_of(annotation: Any) -> str | None:
    """Who made an annotation: Label Studio gives the user's id (or, nested, the user with an email)."""
    who = _field(annotation, "completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return None if who is None else str(who)


def record_task(db: Database, task: Any) -> bool:
    """A task as Label Studio lists it (with its annotations)."""
    return record_annotation(db, int(_field(task, "id")), current_annotation(_field(task, "annotations") or []))
