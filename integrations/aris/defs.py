"""The Aris domain's Dagster definitions, registered only when ``VBATCH_ARIS_DATABASE_URL`` is set:
``aristotle_sensor`` (changes in Aristotle, and gold stars changed in vbatch), the ``aris_sync`` asset that
applies them both ways, and its checks."""

import hashlib
import json
from datetime import datetime, timedelta

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetSelection,
    Backoff,
    DefaultSensorStatus,
    Definitions,
    Failure,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    asset,
    asset_check,
    define_asset_job,
    in_process_executor,
    sensor,
)
from sqlalchemy import func, select

from integrations.aris.aristotle import Aristotle, AristotleSchemaMismatch, AristotleUnavailable
from integrations.aris.models import ArisEvent, ArisLink
from integrations.aris.sync import (
    link_new_tasks,
    link_reported,
    link_tasks_in_label_studio,
    linked_ids,
    mark_vbatch_changes,
    observe,
    pending_links,
    recent_events,
    sync_pending,
)
from resources import LabelStudio, MetadataDB
from resources.label_studio import LabelStudioUnavailable
from vbatch_pipelines.store.models import CurationTask

ARIS_SYNC_JOB = "aris_sync_job"
LOOKBACK_S = 60  # re-read this much before the cursor: a transaction that committed late is not missed
FULL_READ_EVERY_S = 300  # re-read every linked conquest this often: catches writes that left "updatedAt" alone


@asset(group_name="aris", kinds={"postgres", "labelstudio"},
       retry_policy=RetryPolicy(max_retries=3, delay=10, backoff=Backoff.EXPONENTIAL))
def aris_sync(context: AssetExecutionContext, metadata_db: MetadataDB, aristotle: Aristotle,
              label_studio: LabelStudio) -> MaterializeResult:
    """Pending changes applied both ways: gold stars to Aristotle (VICTORY and one rating row, compare-and-
    set), VICTORY/DEFEAT from Aristotle to Label Studio and vbatch; conflicts resolved for Aristotle."""
    db = metadata_db.db
    link_new_tasks(db)
    try:
        aristotle.check_schema()  # one clear failure, not one per link retried with back-off
        report = sync_pending(db, aristotle, label_studio, log=context.log.info)
    except AristotleSchemaMismatch as exc:
        raise Failure(exc.message, allow_retries=False) from exc
    except AristotleUnavailable as exc:
        raise Failure(f"Aristotle is unreachable; pending changes wait and are retried: {exc}") from exc
    waiting = len(pending_links(db, due_only=False))
    conflicts, recent_conflicts = recent_events(db, "conflict")
    unknown, recent_unknown = recent_events(db, "unknown_conquest")
    return MaterializeResult(metadata={
        **{f"{k}": v for k, v in sorted(report.outcomes.items())},
        "written": report.written, "still_pending": waiting,
        "errors": MetadataValue.json(report.errors[:20]),
        # Aristotle won these (both sides had changed); the API lists them all: GET /v1/aris/conflicts.
        "conflicts_total": conflicts, "recent_conflicts": MetadataValue.json(recent_conflicts),
        # tasks whose Label Studio data names a conquest Aristotle does not have: left unlinked
        "unknown_conquests_total": unknown, "recent_unknown_conquests": MetadataValue.json(recent_unknown),
    })


def _check(passed: bool, problems: list, severity=AssetCheckSeverity.ERROR, **metadata) -> AssetCheckResult:
    return AssetCheckResult(passed=passed, severity=severity, metadata={
        "count": len(problems), "problems": MetadataValue.json(problems[:20]), **metadata})


@asset_check(asset=aris_sync, description="Gold star in vbatch ⇔ VICTORY in Aristotle, for every linked conquest "
                                          "that is not waiting to be synced.")
def sides_agree(metadata_db: MetadataDB, aristotle: Aristotle) -> AssetCheckResult:
    db = metadata_db.db
    with db.session() as session:
        rows = session.execute(select(ArisLink.conquest_id, CurationTask.gold_star)
                               .join(CurationTask, CurationTask.ls_task_id == ArisLink.ls_task_id)
                               .where(ArisLink.pending.is_(False))).all()
    victories = aristotle.victory_ids([conquest_id for conquest_id, _ in rows])
    problems = [{"conquest_id": c, "gold_star": gold, "victory": c in victories}
                for c, gold in rows if gold != (c in victories)]
    return _check(not problems, problems, linked=len(rows))


@asset_check(asset=aris_sync, description="No link is failing to sync (failures back off and retry).")
def no_failed_syncs(metadata_db: MetadataDB) -> AssetCheckResult:
    with metadata_db.db.session() as session:
        failing = [{"conquest_id": c, "attempts": a, "error": e} for c, a, e in session.execute(
            select(ArisLink.conquest_id, ArisLink.attempts, ArisLink.last_error)
            .where(ArisLink.last_error.is_not(None)))]
        failures = session.scalar(select(func.count()).select_from(ArisEvent).where(ArisEvent.kind == "failed"))
    return _check(not failing, failing, failed_events=int(failures or 0))


@asset_check(asset=aris_sync, description="At most one vbatch rating row per conquest in ml_analysis_rating.")
def no_duplicate_rating_rows(metadata_db: MetadataDB, aristotle: Aristotle) -> AssetCheckResult:
    counts = aristotle.vbatch_rating_counts(metadata_db.db.install_id())
    problems = [{"conquest_id": c, "rows": n} for c, n in counts.items() if n > 1]
    return _check(not problems, problems, conquests_rated=len(counts))


@asset_check(asset=aris_sync, description="Every VICTORY conquest that has a batch result is linked to its task.")
def victories_linked(metadata_db: MetadataDB, aristotle: Aristotle) -> AssetCheckResult:
    from integrations.aris.schemas import conquest_schemas

    with metadata_db.db.session() as session:
        results = set(session.scalars(select(CurationTask.custom_id).where(
            CurationTask.schema.in_(list(conquest_schemas())), CurationTask.ls_task_id.is_not(None))))
        linked = set(session.scalars(select(ArisLink.conquest_id).where(ArisLink.ls_task_id.is_not(None))))
    unlinked = sorted(aristotle.victory_ids(results) - linked)
    return _check(not unlinked, unlinked, severity=AssetCheckSeverity.WARN)


aris_sync_job = define_asset_job(ARIS_SYNC_JOB, selection=AssetSelection.assets(aris_sync),
                                 executor_def=in_process_executor,
                                 description="Apply pending changes between Aristotle and vbatch's gold stars.")


def _cursor(raw: str | None) -> dict:
    return json.loads(raw) if raw else {"at": None, "id": "", "full_at": 0}


@sensor(job=aris_sync_job, minimum_interval_seconds=10, default_status=DefaultSensorStatus.RUNNING)
def aristotle_sensor(context: SensorEvaluationContext, metadata_db: MetadataDB, aristotle: Aristotle,
                     label_studio: LabelStudio):
    """Conquests changed in Aristotle since the cursor (``"updatedAt"``, id; with a look-back for late commits)
    and, every few minutes, every linked conquest; gold stars changed in vbatch; tasks whose Label Studio data
    names a conquest (linked once Aristotle has it). Whatever differs from what both sides last agreed on is
    pending, and one sync run is requested for that state (run_key: a replayed tick asks for nothing new).
    Aristotle down: skip, the cursor stays; Label Studio down: its tasks are read from the same cursor next tick."""
    import time

    db = metadata_db.db
    cursor = _cursor(context.cursor)
    link_new_tasks(db)
    read = 0
    changed: list[str] = []
    after = datetime.fromisoformat(cursor["at"]) - timedelta(seconds=LOOKBACK_S) if cursor["at"] else None
    last = (cursor["at"], cursor["id"])
    try:
        aristotle.check_schema()
    except AristotleSchemaMismatch as exc:
        return SkipReason(f"Refused: {exc.message}")
    except AristotleUnavailable as exc:
        return SkipReason(f"Aristotle is unreachable; will read from the same cursor next tick ({exc})")
    try:
        try:  # tasks of any batch whose Label Studio data names a conquest
            cursor["ls"], _, problems = link_tasks_in_label_studio(db, aristotle, label_studio, cursor.get("ls", {}))
            for problem in problems:
                context.log.warning(f"Task {problem['task_id']} names conquest {problem['conquest_id']!r} in its "
                                    f"data: {problem['reason']}; it stays unlinked")
        except LabelStudioUnavailable as exc:
            context.log.info(f"Label Studio is unreachable; its tasks' conquest ids are read next tick ({exc})")
        for page in aristotle.changed_since(after, ""):
            read += len(page)
            link_reported(db, aristotle, page)
            changed += observe(db, page)
            tail = page[-1]
            if tail.stamp and (last[0] is None or (tail.stamp, tail.id) > last):
                last = (tail.stamp, tail.id)
        full = time.time() - cursor["full_at"] >= FULL_READ_EVERY_S
        if full:
            changed += observe(db, aristotle.read(linked_ids(db)).values())
    except AristotleUnavailable as exc:
        return SkipReason(f"Aristotle is unreachable; will read from the same cursor next tick ({exc})")
    changed += mark_vbatch_changes(db)
    context.update_cursor(json.dumps({"at": last[0], "id": last[1], "ls": cursor.get("ls", {}),
                                      "full_at": time.time() if full else cursor["full_at"]}))
    pending = [(link.conquest_id, link.attempts) for link in pending_links(db) if link.ls_task_id is not None]
    if not pending:
        return SkipReason(f"Read {read} conquest(s){' and every linked one' if full else ''}; nothing to sync")
    digest = hashlib.sha256(json.dumps(sorted(pending)).encode()).hexdigest()[:16]
    return RunRequest(run_key=f"aris-sync-{digest}", tags={"vbatch/aris_pending": str(len(pending))})


defs = Definitions(assets=[aris_sync], asset_checks=[sides_agree, no_failed_syncs, no_duplicate_rating_rows,
                                                     victories_linked],
                   jobs=[aris_sync_job], sensors=[aristotle_sensor])
