"""Keeping Aristotle's conquests and vbatch's gold stars in agreement, both ways.

Gold star in vbatch ⇔ ``result = 'VICTORY'`` in Aristotle. Each link remembers the gold state both sides last
agreed on and the Aristotle row state vbatch last saw (``result``, ``"updatedAt"``). A round compares:

- both sides gold-equal                      → agreed; nothing is written (a replay, or vbatch's own write read
                                               back, changes nothing: no event, no run, no ``updatedAt`` bump);
- Aristotle's result changed since then       → its state goes to Label Studio and vbatch (edits kept); when
                                               vbatch changed too, Aristotle wins and the conflict is recorded;
- only vbatch changed                        → written to Aristotle by compare-and-set on the row state read
                                               this round: a row that changed in between is never overwritten,
                                               the link stays pending and the next round re-reads it.

Failures leave the link pending with a back-off; nothing half-done is recorded as agreed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select, update

from integrations.aris.aristotle import Aristotle, AristotleUnavailable, Conquest, rating_id
from integrations.aris.models import ArisEvent, ArisLink
from integrations.aris.schemas import ID_FIELD, conquest_schemas
from vbatch_pipelines.curation.sync import write_through
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import Batch, CurationTask

MAX_BACKOFF_S = 300
DEFAULT_RATING = 5  # the rating row's when the expert gave none


def now() -> int:
    return int(time.time())


@dataclass
class SyncReport:
    """What one round did, by outcome (``to_aristotle``, ``to_vbatch``, ``conflict``, ``agreed``, ...)."""

    outcomes: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    failures: list[Exception] = field(default_factory=list)

    def add(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    @property
    def written(self) -> int:
        return sum(self.outcomes.get(k, 0) for k in ("to_aristotle", "to_vbatch", "conflict"))


def record_event(db: Database, conquest_id: str, kind: str, **detail: Any) -> None:
    with db.session() as session:
        session.add(ArisEvent(conquest_id=conquest_id, kind=kind, detail=detail or None, created_at=now()))


def recent_events(db: Database, kind: str, limit: int = 20) -> tuple[int, list[dict]]:
    """How many events of ``kind`` there are, and the newest ``limit`` of them (newest first)."""
    with db.session() as session:
        total = session.scalar(select(func.count()).select_from(ArisEvent).where(ArisEvent.kind == kind))
        newest = session.scalars(select(ArisEvent).where(ArisEvent.kind == kind)
                                 .order_by(ArisEvent.created_at.desc(), ArisEvent.id.desc()).limit(limit))
        return int(total or 0), [event.to_openai() for event in newest]


# -- links ----------------------------------------------------------------------------------------------


def link_new_tasks(db: Database) -> int:
    """Link each conquest batch's curation tasks (custom_id = conquest id) once Label Studio has them; a link
    waiting for its task (a VICTORY pushed before the batch was reviewed) gets it. Returns how many."""
    names = list(conquest_schemas())
    with db.session() as session:
        linked = select(ArisLink.ls_task_id).where(ArisLink.ls_task_id.is_not(None))
        rows = session.execute(
            select(CurationTask.ls_task_id, CurationTask.custom_id, CurationTask.batch_id, Batch.metadata_)
            .join(Batch, Batch.id == CurationTask.batch_id)
            .where(CurationTask.schema.in_(names), CurationTask.ls_task_id.is_not(None),
                   CurationTask.ls_task_id.not_in(linked))).all()
        return len(_attach(session, [(task_id, conquest_id, batch_id, metadata or {})
                                     for task_id, conquest_id, batch_id, metadata in rows]))


def _attach(session, rows: list[tuple[int, str, str | None, dict]]) -> list[str]:
    """Link each (task id, conquest id, batch id, {philosopher, domain, conquest_type}) not linked yet;
    a conquest already linked to an earlier task keeps that one. Returns the conquest ids linked."""
    if not rows:
        return []
    stamp = now()
    existing = {link.conquest_id: link for link in session.scalars(
        select(ArisLink).where(ArisLink.conquest_id.in_([r[1] for r in rows])))}
    attached = []
    for task_id, conquest_id, batch_id, about in rows:
        link = existing.get(conquest_id)
        if link is not None and link.ls_task_id is not None:
            continue  # linked to an earlier review of the same conquest; the first one stays
        if link is None:
            link = ArisLink(conquest_id=conquest_id, created_at=stamp, icl_uses=0, attempts=0, next_attempt_at=0)
            session.add(link)
            existing[conquest_id] = link
        link.ls_task_id, link.batch_id, link.pending, link.updated_at = task_id, batch_id, True, stamp
        link.philosopher = link.philosopher or about.get("philosopher")
        link.domain = link.domain or about.get("domain")
        link.conquest_type = link.conquest_type or about.get("conquest_type")
        attached.append(conquest_id)
    return attached


def _conquest_id(value: Any) -> str | None:
    """A task data's ``conquest_id`` as an id Aristotle could hold (None: it cannot be one)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if 0 < len(value) <= 256 and "\x00" not in value else None


def link_tasks_by_data(db: Database, aristotle: Aristotle,
                       tasks: Iterable[tuple[int, Any]]) -> tuple[list[str], list[dict]]:
    """Curation tasks whose Label Studio data carries ``conquest_id`` (``tasks``: task id, that value), from
    whatever batch, are linked to it once Aristotle shows the conquest exists. Any other value leaves the task
    unlinked and is reported (an ``unknown_conquest`` event, once per task and value). Aristotle down: raises
    AristotleUnavailable, nothing linked. Returns (conquest ids linked, problems reported now)."""
    found = {int(task_id): value for task_id, value in tasks}
    with db.session() as session:
        ours = dict(session.execute(select(CurationTask.ls_task_id, CurationTask.batch_id)
                                    .where(CurationTask.ls_task_id.in_(list(found)))).all())
        linked = set(session.scalars(select(ArisLink.ls_task_id).where(ArisLink.ls_task_id.in_(list(ours)))))
    wanted: dict[int, str] = {}
    problems: list[dict] = []
    for task_id in sorted(set(ours) - linked):
        conquest_id = _conquest_id(found[task_id])
        if conquest_id is None:
            problems.append({"task_id": task_id, "conquest_id": str(found[task_id])[:256].replace("\x00", ""),
                             "reason": "not a conquest id"})
        else:
            wanted[task_id] = conquest_id
    rows = aristotle.read(wanted.values())
    problems += [{"task_id": task_id, "conquest_id": c, "reason": "no such conquest in Aristotle"}
                 for task_id, c in wanted.items() if c not in rows]
    with db.session() as session:
        attached = _attach(session, [
            (task_id, c, ours[task_id], {"philosopher": rows[c].philosopher, "domain": rows[c].domain,
                                         "conquest_type": rows[c].conquest_type})
            for task_id, c in wanted.items() if c in rows])
        reported = {(e.conquest_id, (e.detail or {}).get("task_id")) for e in session.scalars(
            select(ArisEvent).where(ArisEvent.kind == "unknown_conquest",
                                    ArisEvent.conquest_id.in_([p["conquest_id"] for p in problems])))}
        problems = [p for p in problems if (p["conquest_id"], p["task_id"]) not in reported]
        session.add_all(ArisEvent(conquest_id=p["conquest_id"], kind="unknown_conquest",
                                  detail={"task_id": p["task_id"], "reason": p["reason"]}, created_at=now())
                        for p in problems)
    return attached, problems


def link_tasks_in_label_studio(db: Database, aristotle: Aristotle, label_studio,
                               since: dict[str, str]) -> tuple[dict[str, str], list[str], list[dict]]:
    """Read the tasks changed in vbatch's other projects (not the conquest ones: their tasks are linked by
    their batch) since ``since`` (project id -> Label Studio ``updated_at``) whose data has ``conquest_id``,
    and link them (``link_tasks_by_data``). Returns the new ``since``, the conquest ids linked, the problems."""
    from resources.label_studio import iso

    if not label_studio.enabled:
        return since, [], []
    conquest_projects = {schema.project_title for schema in conquest_schemas().values()}
    since, found = dict(since), []
    for project_id, title in label_studio.projects().items():
        if title in conquest_projects:
            continue
        tasks = label_studio.tasks_with_data(project_id, ID_FIELD, since.get(str(project_id)))
        if tasks:
            found += [(task.id, (task.data or {}).get(ID_FIELD)) for task in tasks]
            since[str(project_id)] = max(iso(task.updated_at) for task in tasks)
    linked: list[str] = []
    problems: list[dict] = []
    for start in range(0, len(found), 900):
        done, reported = link_tasks_by_data(db, aristotle, found[start:start + 900])
        linked, problems = linked + done, problems + reported
    return since, linked, problems


def link_reported(db: Database, aristotle: Aristotle, conquests: Iterable[Conquest], chunk: int = 900) -> list[str]:
    """Conquests read from Aristotle that a task's data named before they existed there (reported as
    ``unknown_conquest``): those tasks are linked now. Returns the conquest ids linked."""
    ids = [c.id for c in conquests]
    tasks: list[tuple[int, str]] = []
    with db.session() as session:
        if session.scalar(select(ArisEvent.id).where(ArisEvent.kind == "unknown_conquest").limit(1)) is None:
            return []  # the usual case: one indexed look, not one per chunk of the page
        for start in range(0, len(ids), chunk):
            tasks += [(e.detail["task_id"], e.conquest_id) for e in session.scalars(
                select(ArisEvent).where(ArisEvent.kind == "unknown_conquest",
                                        ArisEvent.conquest_id.in_(ids[start:start + chunk])))
                      if (e.detail or {}).get("task_id") is not None]
    return link_tasks_by_data(db, aristotle, tasks)[0] if tasks else []


def ensure_link(db: Database, conquest: Conquest) -> ArisLink:
    """The conquest's link, created (without a task yet) when it has none; marked pending."""
    with db.session() as session:
        link = session.get(ArisLink, conquest.id)
        if link is None:
            link = ArisLink(conquest_id=conquest.id, created_at=now(), icl_uses=0, attempts=0, next_attempt_at=0)
            session.add(link)
        link.philosopher, link.domain = conquest.philosopher, conquest.domain
        link.conquest_type = link.conquest_type or conquest.conquest_type
        link.pending, link.next_attempt_at, link.updated_at = True, 0, now()
        return link


def observe(db: Database, conquests: Iterable[Conquest], chunk: int = 900) -> list[str]:
    """Rows read from Aristotle: a linked conquest whose row differs from what vbatch last saw becomes
    pending. Returns those ids (vbatch's own writes were seen as written: they never come back)."""
    rows = {c.id: c for c in conquests}
    ids = list(rows)
    changed: list[str] = []
    with db.session() as session:
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            for link_id, result, stamp, pending in session.execute(
                    select(ArisLink.conquest_id, ArisLink.seen_result, ArisLink.seen_updated_at, ArisLink.pending)
                    .where(ArisLink.conquest_id.in_(part))):
                row = rows[link_id]
                if (row.result, row.stamp) != (result, stamp) and not pending:
                    changed.append(link_id)
        for start in range(0, len(changed), chunk):
            session.execute(update(ArisLink).where(ArisLink.conquest_id.in_(changed[start:start + chunk]))
                            .values(pending=True, next_attempt_at=0, updated_at=now()))
    return changed


def mark_vbatch_changes(db: Database, task_ids: Iterable[int] | None = None) -> list[str]:
    """Links whose task's gold star differs from what both sides last agreed on become pending (of
    ``task_ids`` only, when given: the webhook's and the API's reviews). Returns their conquest ids."""
    with db.session() as session:
        query = (select(ArisLink.conquest_id).join(CurationTask, CurationTask.ls_task_id == ArisLink.ls_task_id)
                 .where(ArisLink.pending.is_(False),
                        or_(and_(ArisLink.agreed_gold.is_(None), CurationTask.gold_star.is_(True)),
                            ArisLink.agreed_gold != CurationTask.gold_star)))
        if task_ids is not None:
            query = query.where(CurationTask.ls_task_id.in_(list(task_ids)))
        ids = list(session.scalars(query))
        if ids:
            session.execute(update(ArisLink).where(ArisLink.conquest_id.in_(ids))
                            .values(pending=True, next_attempt_at=0, updated_at=now()))
    return ids


def pending_links(db: Database, ids: Iterable[str] | None = None, *, due_only: bool = True) -> list[ArisLink]:
    with db.session() as session:
        query = select(ArisLink).where(ArisLink.pending.is_(True)).order_by(ArisLink.updated_at, ArisLink.conquest_id)
        if ids is not None:
            query = query.where(ArisLink.conquest_id.in_(list(ids)))
        if due_only:
            query = query.where(ArisLink.next_attempt_at <= now())
        return list(session.scalars(query))


def linked_ids(db: Database) -> list[str]:
    with db.session() as session:
        return list(session.scalars(select(ArisLink.conquest_id).where(ArisLink.ls_task_id.is_not(None))))


# -- one round -------------------------------------------------------------------------------------------


def sync_pending(db: Database, aristotle: Aristotle, label_studio, *, ids: Iterable[str] | None = None,
                 log: Callable[[str], None] = lambda message: None) -> SyncReport:
    """Apply every due pending link (or those of ``ids``); Aristotle down: raises AristotleUnavailable after
    recording the back-off of what was not done (what was done stays done)."""
    report = SyncReport()
    links = pending_links(db, ids)
    if not links:
        return report
    rows = aristotle.read([link.conquest_id for link in links])
    emails: dict[str, str] | None = None

    def reviewer_email(reviewer: str | None) -> str:
        nonlocal emails
        if reviewer and "@" in reviewer:
            return reviewer
        if emails is None:
            try:
                emails = label_studio.user_emails()
            except Exception:  # noqa: BLE001 - a missing email is not worth failing a write for
                emails = {}
        return emails.get(reviewer or "", reviewer or "vbatch")

    for position, link in enumerate(links):
        try:
            outcome = sync_link(db, aristotle, label_studio, link, rows.get(link.conquest_id), reviewer_email)
            report.add(outcome)
        except AristotleUnavailable as exc:
            for rest in links[position:]:
                _failed(db, rest, str(exc))
            report.errors.append(str(exc))
            log(f"Aristotle became unreachable after {position} of {len(links)} links: {exc}")
            raise
        except Exception as exc:  # noqa: BLE001 - one link's failure backs off that link only
            _failed(db, link, f"{type(exc).__name__}: {exc}")
            report.add("failed")
            report.errors.append(f"{link.conquest_id}: {exc}")
            report.failures.append(exc)
    log(f"Aris sync: {report.outcomes}")
    return report


def sync_link(db: Database, aristotle: Aristotle, label_studio, link: ArisLink, row: Conquest | None,
              reviewer_email: Callable[[str | None], str]) -> str:
    if link.ls_task_id is None:
        return "waiting_for_task"  # applied when curation_tasks links its task
    with db.session() as session:
        task = session.scalars(select(CurationTask).where(CurationTask.ls_task_id == link.ls_task_id)).first()
    if task is None:
        return "waiting_for_task"
    if row is None:
        raise LookupError(f"conquest {link.conquest_id} is not in Aristotle")
    # Aristotle changed when its result is not the one both sides agreed with (PENDING -> DEFEAT counts: a
    # decision was made there); vbatch changed when the task's gold star is not the agreed one.
    aris_changed = row.result != link.seen_result if link.agreed_gold is not None else row.victory
    vbatch_changed = task.gold_star != bool(link.agreed_gold)
    if row.victory == task.gold_star:
        _agreed(db, link, row, row.victory)
        return "agreed"
    if aris_changed:
        write_through(db, label_studio, task, answer=task.edited_response, rating=task.rating, gold_star=row.victory)
        _agreed(db, link, row, row.victory)
        if vbatch_changed:  # both sides' states, and the one they last agreed on, for GET /v1/aris/conflicts
            record_event(db, link.conquest_id, "conflict", winner="aristotle", task_id=task.ls_task_id,
                         aristotle_result=row.result, aristotle_updated_at=row.stamp, vbatch_gold_star=task.gold_star,
                         vbatch_reviewer=task.reviewer, agreed_gold=link.agreed_gold, agreed_result=link.seen_result)
            return "conflict"
        record_event(db, link.conquest_id, "to_vbatch", result=row.result, gold_star=row.victory)
        return "to_vbatch"
    rating_row = rating_id(db.install_id(), link.conquest_id)
    if task.gold_star:
        # The result VICTORY replaces is recorded first: were this process to die between Aristotle's commit and
        # vbatch's own record, a later un-star would still put back what was there (DEFEAT, not NEUTRAL).
        with db.session() as session:
            session.get(ArisLink, link.conquest_id).prior_result = row.result
        written = aristotle.mark_victory(row, reviewer=reviewer_email(task.reviewer),
                                         rating=task.rating or DEFAULT_RATING, task_id=task.ls_task_id,
                                         annotation_id=task.annotation_id, rating_id=rating_row)
    else:
        written = aristotle.unmark_victory(row, restore=link.prior_result or "NEUTRAL", task_id=task.ls_task_id,
                                           rating_id=rating_row)
    if written is None:  # never overwrite: the next round re-reads the row
        with db.session() as session:
            session.get(ArisLink, link.conquest_id).attempts += 1  # a new state: the sensor asks for a new round
        return "changed_meanwhile"
    _agreed(db, link, written, task.gold_star, prior_result=row.result if task.gold_star else None)
    record_event(db, link.conquest_id, "to_aristotle", result=written.result, previous=row.result)
    return "to_aristotle"


def _agreed(db: Database, link: ArisLink, row: Conquest, gold: bool, prior_result: str | None = None) -> None:
    with db.session() as session:
        current = session.get(ArisLink, link.conquest_id)
        example = gold and row.victory  # an ICL example from now on, newest first
        current.example_since = (current.example_since or now()) if example else None
        current.agreed_gold, current.seen_result, current.seen_updated_at = gold, row.result, row.stamp
        if prior_result is not None or not gold:
            current.prior_result = prior_result
        current.philosopher, current.domain = row.philosopher, row.domain
        current.conquest_type = current.conquest_type or row.conquest_type
        current.pending, current.attempts, current.next_attempt_at, current.last_error = False, 0, 0, None
        current.updated_at = now()


def _failed(db: Database, link: ArisLink, error: str) -> None:
    with db.session() as session:
        current = session.get(ArisLink, link.conquest_id)
        current.attempts += 1
        current.next_attempt_at = now() + min(MAX_BACKOFF_S, 2 ** current.attempts)
        current.last_error = error[:2000]
        current.updated_at = now()
    record_event(db, link.conquest_id, "failed", error=error[:2000])


def on_reviews_changed(resources: dict, task_ids: list[int]) -> None:
    """The API recorded reviews (its gold-star route, the Label Studio webhook): linked conquests are synced
    now instead of at the next sensor tick. Best effort: whatever fails stays pending for the sensor."""
    db = resources.metadata_db.db
    ids = mark_vbatch_changes(db, task_ids)
    if ids:
        try:
            sync_pending(db, resources["aristotle"], resources.label_studio, ids=ids)
        except AristotleUnavailable:
            pass  # recorded as pending with a back-off; the sensor retries
