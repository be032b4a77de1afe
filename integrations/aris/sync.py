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

from sqlalchemy import and_, or_, select, update

from integrations.aris.aristotle import Aristotle, AristotleUnavailable, Conquest
from integrations.aris.models import ArisEvent, ArisLink
from integrations.aris.schemas import conquest_schemas
from vbatch_pipelines.curation.sync import record_annotation
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


# -- links ----------------------------------------------------------------------------------------------


def link_new_tasks(db: Database) -> int:
    """Link each conquest batch's curation tasks (custom_id = conquest id) once Label Studio has them; a link
    waiting for its task (a VICTORY pushed before the batch was reviewed) gets it. Returns how many."""
    names = list(conquest_schemas())
    stamp = now()
    with db.session() as session:
        linked = select(ArisLink.ls_task_id).where(ArisLink.ls_task_id.is_not(None))
        rows = session.execute(
            select(CurationTask.ls_task_id, CurationTask.custom_id, CurationTask.batch_id, Batch.metadata_)
            .join(Batch, Batch.id == CurationTask.batch_id)
            .where(CurationTask.schema.in_(names), CurationTask.ls_task_id.is_not(None),
                   CurationTask.ls_task_id.not_in(linked))).all()
        if not rows:
            return 0
        existing = {link.conquest_id: link for link in session.scalars(
            select(ArisLink).where(ArisLink.conquest_id.in_([r.custom_id for r in rows])))}
        count = 0
        for task_id, conquest_id, batch_id, metadata in rows:
            metadata = metadata or {}
            link = existing.get(conquest_id)
            if link is not None and link.ls_task_id is not None:
                continue  # linked to an earlier review of the same conquest; the first one stays
            if link is None:
                link = ArisLink(conquest_id=conquest_id, created_at=stamp, icl_uses=0, attempts=0, next_attempt_at=0)
                session.add(link)
                existing[conquest_id] = link
            link.ls_task_id, link.batch_id, link.pending, link.updated_at = task_id, batch_id, True, stamp
            link.philosopher = link.philosopher or metadata.get("philosopher")
            link.domain = link.domain or metadata.get("domain")
            link.conquest_type = link.conquest_type or metadata.get("conquest_type")
            count += 1
        return count


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
        annotation = label_studio.write_review(task.ls_task_id, task.edited_response, task.rating, row.victory,
                                               task.annotation_id)
        record_annotation(db, task.ls_task_id, annotation)
        _agreed(db, link, row, row.victory)
        if vbatch_changed:
            record_event(db, link.conquest_id, "conflict", winner="aristotle", aristotle_result=row.result,
                         vbatch_gold_star=task.gold_star)
            return "conflict"
        record_event(db, link.conquest_id, "to_vbatch", result=row.result, gold_star=row.victory)
        return "to_vbatch"
    if task.gold_star:
        written = aristotle.mark_victory(row, reviewer=reviewer_email(task.reviewer),
                                         rating=task.rating or DEFAULT_RATING, task_id=task.ls_task_id,
                                         annotation_id=task.annotation_id)
    else:
        written = aristotle.unmark_victory(row, restore=link.prior_result or "NEUTRAL", task_id=task.ls_task_id)
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
    db = resources["metadata_db"].db
    ids = mark_vbatch_changes(db, task_ids)
    if ids:
        try:
            sync_pending(db, resources["aristotle"], resources["label_studio"], ids=ids)
        except AristotleUnavailable:
            pass  # recorded as pending with a back-off; the sensor retries
