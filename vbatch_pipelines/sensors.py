"""Sensors: launch batches accepted while Dagster was unreachable; settle batches whose run is gone."""


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

from resources import FileStore, MetadataDB
from vbatch_pipelines.batch.service import batches_to_settle, batches_without_run, end_batch
from vbatch_pipelines.jobs import batch_job
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
