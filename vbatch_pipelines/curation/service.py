"""Curation state in the metadata DB: which results went to Label Studio and what experts said.

The sensor, the webhook receiver and the REST API all record reviews through ``apply_reviews``; it is
idempotent (the same annotation twice changes nothing) and stamps ``changed_seq`` only on a real change,
so "anything new since dataset X" is one indexed query.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, bindparam, func, select, update

from vbatch_pipelines.curation.schemas import Review
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import (
    DEFAULT_PROJECT,
    SFT,
    CurationAssignment,
    CurationReview,
    CurationTask,
    Dataset,
    Project,
)


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


@dataclass(frozen=True)
class AnnotationReview:
    """One Label Studio annotation as vbatch records it: who made it, what it says, when (UTC ISO)."""

    annotation_id: int
    reviewer: str
    review: Review
    updated_at: str | None = None


def apply_reviews(db: Database, ls_task_id: int, found: Iterable[AnnotationReview], *, complete: bool = False,
                  removed: Iterable[int] = (), only_if_newer: bool = False) -> bool:
    """Record annotations of a task (``complete``: ``found`` is every live one, as Label Studio lists them; the
    rest are gone), forget the ``removed`` ones, and settle the task's review from them; True when its review
    changed (the reviewer alone is not a change). ``only_if_newer`` (webhook events, which may come late or
    twice) ignores an annotation older than the one recorded."""
    found = list(found)
    with db.session() as session:
        task = session.scalars(select(CurationTask).where(CurationTask.ls_task_id == ls_task_id)
                               .with_for_update()).first()
        if task is None:
            return False
        recorded = {r.annotation_id: r for r in session.scalars(
            select(CurationReview).where(CurationReview.ls_task_id == ls_task_id))}
        if not recorded and task.annotation_id is not None:  # reviewed before reviews were kept one by one
            recorded[task.annotation_id] = CurationReview(
                annotation_id=task.annotation_id, ls_task_id=ls_task_id, reviewer=task.reviewer or "unknown",
                answer=task.edited_response, rating=task.rating, gold_star=task.gold_star,
                updated_at=task.annotation_updated_at, recorded_at=int(time.time()))
            session.add(recorded[task.annotation_id])
        listed = {f.annotation_id for f in found}
        gone = set(removed) | ({a for a in recorded if a not in listed} if complete else set())
        for annotation_id in gone & set(recorded):
            session.delete(recorded.pop(annotation_id))
        now = int(time.time())
        for item in found:
            row = recorded.get(item.annotation_id)
            if row is not None and only_if_newer and item.updated_at and row.updated_at \
                    and item.updated_at < row.updated_at:
                continue
            if row is None:
                row = recorded[item.annotation_id] = CurationReview(annotation_id=item.annotation_id,
                                                                    ls_task_id=ls_task_id, recorded_at=now)
                session.add(row)
            row.reviewer, row.answer, row.rating = item.reviewer, item.review.answer, item.review.rating
            row.gold_star, row.updated_at = item.review.gold_star, item.updated_at or row.updated_at
        project = session.get(Project, task.project_id)
        return _settle(task, list(recorded.values()), project.review_agreement if project else 1)


def _settle(task: CurationTask, reviews: list[CurationReview], needed: int) -> bool:
    """A task's review from its annotations: the latest one's answer and rating; a gold star when at least
    ``needed`` reviewers (each by their latest annotation) star it; agreement, the share of reviewers on the
    majority's side (two reviewers or more)."""
    ordered = sorted(reviews, key=lambda r: (r.updated_at or "", r.annotation_id))
    latest = {r.reviewer: r for r in ordered}  # each reviewer's vote is their latest annotation
    current = ordered[-1] if ordered else None
    voters, votes = len(latest), sum(r.gold_star for r in latest.values())
    edited = current.answer if current is not None and current.answer is not None \
        and current.answer != task.response else None
    wanted = {"edited_response": edited, "rating": current.rating if current else None,
              "gold_star": bool(voters) and votes >= needed, "annotated": bool(voters),
              "annotation_id": current.annotation_id if current else None, "reviews": voters, "gold_votes": votes,
              "agreement": round(max(votes, voters - votes) / voters, 4) if voters >= 2 else None}
    # An edit made in Label Studio is checked as the API's PATCH checks it (JSON for json_extraction): an
    # invalid one is recorded with its error, visible on the task, and kept out of datasets.
    wanted["review_error"] = _edit_error(task.schema, wanted["edited_response"])
    if current is not None:
        task.reviewer = current.reviewer
        task.annotation_updated_at = max(task.annotation_updated_at or "", current.updated_at or "") or None
    if all(getattr(task, key) == value for key, value in wanted.items()):
        return False
    if current is None:
        task.reviewer = None
    for key, value in wanted.items():
        setattr(task, key, value)
    task.reviewed_at = int(time.time())
    task.changed_seq = change_stamp()
    return True


def settle_project(db: Database, project_id: str) -> int:
    """Settle every reviewed task of a project again (its review policy changed); how many changed."""
    with db.session() as session:
        ids = list(session.scalars(select(CurationTask.ls_task_id).where(
            CurationTask.project_id == project_id, CurationTask.reviews > 0)))
    return sum(apply_reviews(db, task_id, ()) for task_id in ids)


def _edit_error(schema_name: str, edited: str | None) -> str | None:
    from vbatch_pipelines.curation.schemas import SCHEMAS

    schema = SCHEMAS.get(schema_name)
    if edited is None or schema is None:
        return None
    error = schema.validate(edited)
    return f"The edited answer is not valid for {schema_name}: {error}" if error else None


def clear_annotations(db: Database, annotation_ids: Iterable[int]) -> list[int]:
    """Annotations deleted in Label Studio: their reviews are forgotten; returns the tasks whose review changed."""
    annotation_ids = list(annotation_ids)
    with db.session() as session:
        task_ids = set(session.scalars(select(CurationReview.ls_task_id)
                                       .where(CurationReview.annotation_id.in_(annotation_ids))))
        task_ids |= set(session.scalars(select(CurationTask.ls_task_id)
                                        .where(CurationTask.annotation_id.in_(annotation_ids))))
    return [task_id for task_id in sorted(task_ids) if apply_reviews(db, task_id, (), removed=annotation_ids)]


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
                                     .where(Dataset.status == "ready", Dataset.kind == SFT, Dataset.filter.is_(None))
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
    """The project's latest whole version of ``kind`` (a filtered one is a part: never "the latest")."""
    with db.session() as session:
        return session.scalars(ready_datasets(project_id, kind).where(Dataset.filter.is_(None))).first()


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
            "gold_stars": int(gold or 0), "by_schema": by_schema, "by_day": by_day,
            "reviewers": agreement_stats(db, project_id)}



MAX_REVIEWERS = 10


def set_review_policy(db: Database, project_id: str, *, annotations_per_task: int | None = None,
                      gold_star_agreement: int | None = None) -> Project:
    """A project's review policy: N annotations wanted per task, k of them starring it for a gold star (1 <= k <=
    N <= 10); its reviewed tasks are settled again under it. Bad values are refused whole."""
    from vbatch_pipelines.projects import ProjectError, ProjectNotFound

    project = db.get(Project, project_id)
    if project is None:
        raise ProjectNotFound(f"No project with id '{project_id}'", "project_id")
    n = annotations_per_task if annotations_per_task is not None else project.review_annotations
    k = gold_star_agreement if gold_star_agreement is not None else project.review_agreement
    for name, value in (("annotations_per_task", n), ("gold_star_agreement", k)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REVIEWERS:
            raise ProjectError(f"review.{name} must be an integer from 1 to {MAX_REVIEWERS}", f"review.{name}")
    if k > n:
        raise ProjectError(f"review.gold_star_agreement ({k}) cannot exceed review.annotations_per_task ({n}): no "
                           "task could ever be a gold star", "review.gold_star_agreement")
    with db.session() as session:
        row = session.get(Project, project_id, with_for_update=True)
        row.review_annotations, row.review_agreement = n, k
    settle_project(db, project_id)
    return db.get(Project, project_id)


MAX_PAGE = 100


def list_tasks(db: Database, project_id: str, *, batch_id: str | None = None, schema: str | None = None,
               gold_star: bool | None = None, reviewed: bool | None = None, assignee: str | None = None,
               after: int | None = None, limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
    """A page of a project's review tasks (those in Label Studio), by task id; with each its reviewers' votes and
    assignees. ``reviewed``: its review is complete (as many reviewers as the project wants); with ``assignee``,
    whether that reviewer reviewed it. Returns (tasks, has_more)."""
    from sqlalchemy import exists

    project = db.get(Project, project_id)
    wanted = project.review_annotations if project else 1
    query = select(CurationTask).where(CurationTask.project_id == project_id, CurationTask.ls_task_id.is_not(None))
    if batch_id is not None:
        query = query.where(CurationTask.batch_id == batch_id)
    if schema is not None:
        query = query.where(CurationTask.schema == schema)
    if gold_star is not None:
        query = query.where(CurationTask.gold_star.is_(gold_star))
    if assignee is not None:
        query = query.where(exists().where(CurationAssignment.ls_task_id == CurationTask.ls_task_id,
                                           CurationAssignment.reviewer == assignee))
    if reviewed is not None:
        if assignee is not None:
            done = exists().where(CurationReview.ls_task_id == CurationTask.ls_task_id,
                                  CurationReview.reviewer == assignee)
        else:
            done = CurationTask.reviews >= wanted
        query = query.where(done if reviewed else ~done)
    if after is not None:
        query = query.where(CurationTask.ls_task_id > after)
    with db.session() as session:
        rows = list(session.scalars(query.order_by(CurationTask.ls_task_id).limit(limit + 1)))
    return with_reviews(db, rows[:limit]), len(rows) > limit


def with_reviews(db: Database, tasks: list[CurationTask]) -> list[dict[str, Any]]:
    """Tasks as the API shows them, with each reviewer's latest vote and the task's assignees."""
    ids = [task.ls_task_id for task in tasks]
    votes: dict[int, dict[str, dict[str, Any]]] = {}
    assignees: dict[int, list[str]] = {}
    with db.session() as session:
        for review in session.scalars(select(CurationReview).where(CurationReview.ls_task_id.in_(ids))
                                      .order_by(CurationReview.updated_at, CurationReview.annotation_id)):
            votes.setdefault(review.ls_task_id, {})[review.reviewer] = {
                "reviewer": review.reviewer, "gold_star": review.gold_star, "rating": review.rating,
                "edited": review.answer is not None, "updated_at": review.updated_at}
        for task_id, reviewer in session.execute(select(CurationAssignment.ls_task_id, CurationAssignment.reviewer)
                                                 .where(CurationAssignment.ls_task_id.in_(ids))
                                                 .order_by(CurationAssignment.reviewer)):
            assignees.setdefault(task_id, []).append(reviewer)
    return [{**task.to_api(), "votes": list(votes.get(task.ls_task_id, {}).values()),
             "assignees": assignees.get(task.ls_task_id, [])} for task in tasks]


def project_tasks(db: Database, project_id: str, task_ids: list[int]) -> list[CurationTask]:
    """The project's tasks with these ids, in that order; NotFound naming those it does not have (another
    project's are as good as missing)."""
    from vbatch_pipelines.errors import NotFound

    with db.session() as session:
        found = {task.ls_task_id: task for task in session.scalars(select(CurationTask).where(
            CurationTask.ls_task_id.in_(task_ids), CurationTask.project_id == project_id))}
    missing = [task_id for task_id in task_ids if task_id not in found]
    if missing:
        raise NotFound(f"No curation task with id {', '.join(map(str, missing[:20]))}"
                       + (f" and {len(missing) - 20} more" if len(missing) > 20 else ""), "task_ids")
    return [found[task_id] for task_id in task_ids]


def assign_tasks(db: Database, project_id: str, task_ids: list[int], reviewers: list[str]) -> None:
    """Hand each task to as many of ``reviewers`` as the project wants annotations (round robin, so the work is
    shared evenly); a task's earlier assignees are replaced."""
    project = db.get(Project, project_id)
    per_task = min(project.review_annotations if project else 1, len(reviewers))
    project_tasks(db, project_id, task_ids)
    now = int(time.time())
    with db.session() as session:
        session.execute(CurationAssignment.__table__.delete().where(CurationAssignment.ls_task_id.in_(task_ids)))
        session.add_all(CurationAssignment(ls_task_id=task_id, reviewer=reviewers[(i * per_task + j) % len(reviewers)],
                                           assigned_at=now)
                        for i, task_id in enumerate(task_ids) for j in range(per_task))


def agreement_stats(db: Database, project_id: str) -> dict[str, Any]:
    """How far a project's reviewers agree: per task (the mean share on the majority's side, over tasks with two
    reviewers or more) and per reviewer (how often their vote matched the task's outcome, on those tasks)."""
    project = db.get(Project, project_id)
    with db.session() as session:
        shared = dict(session.execute(select(CurationTask.ls_task_id, CurationTask.gold_star).where(
            CurationTask.project_id == project_id, CurationTask.reviews >= 2)).all())
        reviews = list(session.execute(
            select(CurationReview.ls_task_id, CurationReview.reviewer, CurationReview.gold_star)
            .join(CurationTask, CurationTask.ls_task_id == CurationReview.ls_task_id)
            .where(CurationTask.project_id == project_id)
            .order_by(CurationReview.updated_at, CurationReview.annotation_id)))
        mean = session.scalar(select(func.avg(CurationTask.agreement)).where(
            CurationTask.project_id == project_id, CurationTask.agreement.is_not(None)))
    latest = {(task_id, reviewer): gold for task_id, reviewer, gold in reviews}
    by_reviewer: dict[str, dict[str, Any]] = {}
    for (task_id, reviewer), gold in sorted(latest.items(), key=lambda item: item[0][1]):
        mine = by_reviewer.setdefault(reviewer, {"reviews": 0, "gold_stars": 0, "shared": 0, "agreed": 0})
        mine["reviews"] += 1
        mine["gold_stars"] += bool(gold)
        if task_id in shared:
            mine["shared"] += 1
            mine["agreed"] += bool(gold) == bool(shared[task_id])
    for mine in by_reviewer.values():
        mine["agreement"] = round(mine.pop("agreed") / mine["shared"], 4) if mine["shared"] else None
    return {"policy": project.review_policy() if project else {"annotations_per_task": 1, "gold_star_agreement": 1},
            "tasks_with_several_reviews": len(shared), "agreement": round(mean, 4) if mean is not None else None,
            "by_reviewer": by_reviewer}
