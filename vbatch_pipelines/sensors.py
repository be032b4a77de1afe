"""Sensors: launch batches accepted while Dagster was unreachable; settle batches whose run is gone;
read reviews from Label Studio and ask for a new gold-star dataset when they changed."""

import json

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from resources import FileStore, LabelStudio, MetadataDB
from resources.label_studio import LabelStudioUnavailable, iso
from vbatch_pipelines.batch.service import batches_to_settle, batches_without_run, end_batch
from vbatch_pipelines.curation.service import latest_change, latest_dataset
from vbatch_pipelines.curation.sync import record_task
from vbatch_pipelines.jobs import batch_job, gold_star_dataset_job
from vbatch_pipelines.launch import BATCH_ID_TAG, run_tags
from vbatch_pipelines.partitions import batch_partitions

LAUNCH_GRACE_S = 5


@sensor(job=batch_job, minimum_interval_seconds=2, default_status=DefaultSensorStatus.RUNNING)
def batch_launch_sensor(context: SensorEvaluationContext, metadata_db: MetadataDB):
    """Batches recorded without a run for a few seconds get one (run_key = batch id: at most one)."""
    waiting = batches_without_run(metadata_db.db, older_than_s=LAUNCH_GRACE_S)
    launch = [
        batch_id for batch_id in waiting
        if not context.instance.get_run_records(RunsFilter(tags={BATCH_ID_TAG: batch_id}), limit=1)
    ]
    if not launch:
        return SkipReason(f"No batch waiting for a run ({len(waiting)} recorded without one already have runs)")
    return SensorResult(
        run_requests=[RunRequest(run_key=b, partition_key=b, tags=run_tags(b)) for b in launch],
        dynamic_partitions_requests=[batch_partitions.build_add_request(launch)],
    )


ACTIVE_RUN = {DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
              DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING}


@sensor(minimum_interval_seconds=10, default_status=DefaultSensorStatus.RUNNING)
def batch_settle_sensor(context: SensorEvaluationContext, metadata_db: MetadataDB, file_store: FileStore):
    """A batch asked to cancel, or past its completion window, ends here when no run is working on it
    (never launched, crashed, or terminated); a running batch_output ends it itself within a second."""
    settled = []
    for batch in batches_to_settle(metadata_db.db):
        run = context.instance.get_run_by_id(batch.dagster_run_id) if batch.dagster_run_id else None
        if run is not None and run.status in ACTIVE_RUN:
            continue
        status = "cancelled" if batch.status == "cancelling" else "expired"
        end_batch(metadata_db.db, file_store.batch_dir(batch.id), batch.id, status)
        settled.append(f"{batch.id} {status}")
    if not settled:
        return SkipReason("No batch to settle")
    context.log.info("settled: " + ", ".join(settled))
    return SkipReason(f"Settled {len(settled)} batch(es): {', '.join(settled)}")


@sensor(job=gold_star_dataset_job, minimum_interval_seconds=10, default_status=DefaultSensorStatus.RUNNING)
def label_studio_sensor(context: SensorEvaluationContext, metadata_db: MetadataDB, label_studio: LabelStudio):
    """Tasks changed in Label Studio since the cursor (per project, ``updated_at``) are read with their
    annotations and recorded; a new gold_star_dataset is requested when reviews changed since the last one
    (from here, the webhook or the API). Label Studio down: skip, the cursor stays, nothing is lost."""
    if not label_studio.enabled:
        return SkipReason(label_studio.disabled_reason)
    db = metadata_db.db
    cursor = json.loads(context.cursor or "{}")
    read = changed = 0
    try:
        for project_id in label_studio.projects():
            tasks = label_studio.changed_tasks(project_id, cursor.get(str(project_id)))
            for task in tasks:
                changed += record_task(db, task)
            if tasks:
                read += len(tasks)
                cursor[str(project_id)] = max(iso(task.updated_at) for task in tasks)
    except LabelStudioUnavailable as exc:
        return SkipReason(f"Label Studio is unreachable; will read from the same cursor next tick ({exc})")
    context.update_cursor(json.dumps(cursor, sort_keys=True))
    seq, dataset = latest_change(db), latest_dataset(db)
    if seq and (dataset is None or seq > dataset.source_seq):
        return RunRequest(run_key=f"gold-star-dataset-{seq}", tags={"vbatch/curation_seq": str(seq)})
    return SkipReason(f"Read {read} changed task(s), {changed} new review(s); dataset up to date")
