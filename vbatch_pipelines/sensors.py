"""Sensors: launch batches that were accepted while Dagster was unreachable."""


from dagster import (
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from resources import MetadataDB
from vbatch_pipelines.batch.service import batches_without_run
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
