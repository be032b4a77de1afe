"""Curation state in the metadata DB: which results went to Label Studio and what experts said.

The sensor, the webhook receiver and the REST API all record reviews through ``apply_review``; it is
idempotent (the same annotation twice changes nothing) and stamps ``changed_seq`` only on a real change,
so "anything new since dataset X" is one indexed query.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Integer, bindparam, func, select, update

from vbatch_pipelines.curation.schemas import Review
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import DEFAULT_PROJECT, SFT, CurationTask, Dataset


def change_stamp() -> int:
    """Microseconds since the epoch: orders changes across processes on one machine."""
    return time.time_ns() // 1000


def known_custom_ids(db: Database, batch_id: str) -> dict[str, int | None]:
    """custom_id -> Label Studio task id (None while the import is not confirmed) for a batch."""
    with db.session() as session:
        rows = session.execute(select(CurationTask.custom_id, CurationTask.ls_task_id)
                               .where(CurationTask.batch_id == batch_id))
        return {custom_id: task_id for custom_id, task_id in rows}


def add_tasks(db: Database, rows: Iterable[dict[str, Any]]) -> None:
    """Record results about to be imported (before the import, so a crash in between is recoverable)."""
    now = int(time.time())
    with db.session() as session:
        session.add_all(CurationTask(created_at=now, **row) for row in rows)


def set_task_ids(db: Database, batch_id: str, ls_project_id: int, ids: dict[str, int]) -> None:
    """Confirm tasks imported into Label Studio project ``ls_project_id`` (one executemany, not one statement
    per task)."""
    if not ids:
        return
    table = CurationTask.__table__
    statement = (update(table)
                 .where(table.c.batch_id == bindparam("b_batch_id"), table.c.custom_id == bindparam("b_custom_id"))
                 .values(ls_task_id=bindparam("b_task_id"), ls_project_id=bindparam("b_project_id")))
    with db.engine.begin() as connection:
        connection.execute(statement, [{"b_batch_id": batch_id, "b_custom_id": custom_id, "b_task_id": task_id,
                                        "b_project_id": ls_project_id} for custom_id, task_id in ids.items()])


def get_task(db: Database, ls_task_id: int) -> CurationTask | None:
    with db.session() as session:
        return session.scalars(select(CurationTask).where(CurationTask.ls_task_id == ls_task_id)).first()


def apply_review(db: Database, ls_task_id: int, review: Review | None, annotation_id: int | None,
                 reviewer: str | None = None, *, updated_at: str | None = None, only_if_newer: bool = False) -> bool:
    """Record a task's current review (None: its annotations are gone) and who made it; True when the review
    changed (the reviewer alone is not a change). ``updated_at`` is the annotation's time in Label Studio;
    ``only_if_newer`` (webhook events, which may come late or twice) ignores an annotation older than the
    one recorded. A listing of the task's annotations is the truth and is recorded as it is."""
    with db.session() as session:
        task = session.scalars(select(CurationTask).where(CurationTask.ls_task_id == ls_task_id)
                               .with_for_update()).first()
        if task is None:
            return False
        recorded = task.annotation_updated_at
        if only_if_newer and updated_at and recorded and updated_at < recorded:
            return False
        if updated_at is not None:
            task.annotation_updated_at = updated_at
        if review is None:
            wanted = {"edited_response": None, "rating": None, "gold_star": False, "annotated": False,
                      "annotation_id": None}
        else:
            edited = review.answer if review.answer is not None and review.answer != task.response else None
            wanted = {"edited_response": edited, "rating": review.rating, "gold_star": review.gold_star,
                      "annotated": True, "annotation_id": annotation_id}
        # An edit made in Label Studio is checked as the API's PATCH checks it (JSON for json_extraction): an
        # invalid one is recorded with its error, visible on the task, and kept out of datasets.
        wanted["review_error"] = _edit_error(task.schema, wanted["edited_response"])
        if reviewer is not None and task.reviewer is None:
            task.reviewer = reviewer
        if all(getattr(task, key) == value for key, value in wanted.items()):
            return False
        task.reviewer = reviewer if review is not None else None
        for key, value in wanted.items():
            setattr(task, key, value)
        task.reviewed_at = int(time.time())
        task.changed_seq = change_stamp()
        return True


def _edit_error(schema_name: str, edited: str | None) -> str | None:
    from vbatch_pipelines.curation.schemas import SCHEMAS

    schema = SCHEMAS.get(schema_name)
    if edited is None or schema is None:
        return None
    error = schema.validate(edited)
    return f"The edited answer is not valid for {schema_name}: {error}" if error else None


def clear_annotations(db: Database, annotation_ids: Iterable[int]) -> list[int]:
    """Annotations deleted in Label Studio: their tasks lose the review; returns those task ids."""
    with db.session() as session:
        task_ids = list(session.scalars(select(CurationTask.ls_task_id)
                                        .where(CurationTask.annotation_id.in_(list(annotation_ids)))))
    return [task_id for task_id in task_ids if apply_review(db, task_id, None, None)]


def latest_change(db: Database, project_id: str = DEFAULT_PROJECT) -> int:
    """The project's last curation change (0: none)."""
    with db.session() as session:
        return session.scalar(select(func.max(CurationTask.changed_seq))
                              .where(CurationTask.project_id == project_id)) or 0


def projects_with_new_reviews(db: Database) -> dict[str, int]:
    """project -> its last curation change, for each project whose reviews changed since its latest dataset."""
    with db.session() as session:
        changes = dict(session.execute(select(CurationTask.project_id, func.max(CurationTask.changed_seq))
                                       .group_by(CurationTask.project_id)).all())
        built = dict(session.execute(select(Dataset.project_id, func.max(Dataset.source_seq))
                                     .where(Dataset.status == "ready", Dataset.kind == SFT)
                                     .group_by(Dataset.project_id)).all())
    return {project: seq for project, seq in sorted(changes.items()) if seq and seq > (built.get(project) or 0)}


def reviewed_tasks(db: Database, project_id: str = DEFAULT_PROJECT, *,
                   gold_stars_only: bool = False) -> list[CurationTask]:
    """The project's reviewed tasks (only the gold stars: ``gold_stars_only``). A review whose edited answer is
    invalid for its schema stays out until it is fixed."""
    chosen = CurationTask.gold_star.is_(True) if gold_stars_only else CurationTask.annotated.is_(True)
    with db.session() as session:
        return list(session.scalars(select(CurationTask).where(CurationTask.project_id == project_id, chosen,
                                                               CurationTask.review_error.is_(None))
                                    .order_by(CurationTask.id)))


def gold_star_tasks(db: Database, project_id: str = DEFAULT_PROJECT) -> list[CurationTask]:
    return reviewed_tasks(db, project_id, gold_stars_only=True)


def ready_datasets(project_id: str = DEFAULT_PROJECT, kind: str | None = SFT):
    """The project's complete dataset versions of ``kind`` (None: both), newest first ("v10" after "v9": by
    length, then text)."""
    query = select(Dataset).where(Dataset.status == "ready", Dataset.project_id == project_id)
    if kind is not None:
        query = query.where(Dataset.kind == kind)
    return query.order_by(func.length(Dataset.version).desc(), Dataset.version.desc())


def latest_dataset(db: Database, project_id: str = DEFAULT_PROJECT, kind: str = SFT) -> Dataset | None:
    with db.session() as session:
        return session.scalars(ready_datasets(project_id, kind)).first()


def stats(db: Database, project_id: str = DEFAULT_PROJECT) -> dict[str, Any]:
    """The project's review counts: in all, per schema, per day."""
    mine = CurationTask.project_id == project_id
    with db.session() as session:
        total, annotated, gold = session.execute(select(
            func.count(), func.sum(CurationTask.annotated.cast(Integer)),
            func.sum(CurationTask.gold_star.cast(Integer))).where(mine)).one()
        by_schema = {schema: {"tasks": n, "annotated": int(a or 0), "gold_stars": int(g or 0)}
                     for schema, n, a, g in session.execute(
                         select(CurationTask.schema, func.count(), func.sum(CurationTask.annotated.cast(Integer)),
                                func.sum(CurationTask.gold_star.cast(Integer)))
                         .where(mine).group_by(CurationTask.schema))}
        day = func.date(func.to_timestamp(CurationTask.reviewed_at)) if db.engine.dialect.name == "postgresql" \
            else func.date(CurationTask.reviewed_at, "unixepoch")
        by_day = {str(d): {"reviewed": n, "gold_stars": int(g or 0)} for d, n, g in session.execute(
            select(day, func.count(), func.sum(CurationTask.gold_star.cast(Integer)))
            .where(mine, CurationTask.reviewed_at.is_not(None)).group_by(day).order_by(day))}
    return {"object": "curation.stats", "tasks": total, "annotated": int(annotated or 0),
            "gold_stars": int(gold or 0), "by_schema": by_schema, "by_day": by_day}

