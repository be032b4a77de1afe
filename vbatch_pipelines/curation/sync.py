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
    return max(live, key=lambda a: (utc_stamp(_field(a, "updated_at")) or "", _field(a, "id") or 0))


def record_annotation(db: Database, task_id: int, annotation: Any | None, *, only_if_newer: bool = False) -> bool:
    """Record a task's current annotation (None: it has none); True when the DB changed. ``only_if_newer``:
    ``annotation`` comes from an event, which is ignored when older than the annotation recorded."""
    if annotation is None:
        return apply_review(db, task_id, None, None)
    review: Review = read_annotation(_field(annotation, "result") or [])
    return apply_review(db, task_id, review, _field(annotation, "id"), reviewer_of(annotation),
                        updated_at=utc_stamp(_field(annotation, "updated_at")), only_if_newer=only_if_newer)


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


def record_task(db: Database, task: Any) -> bool:
    """A task as Label Studio lists it (with its annotations)."""
    return record_annotation(db, int(_field(task, "id")), current_annotation(_field(task, "annotations") or []))
