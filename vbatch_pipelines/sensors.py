"""Sensors and schedules: launch batches and fine-tuning jobs accepted while Dagster was unreachable; settle
those whose run is gone; read reviews from Label Studio and ask for a new gold-star dataset when they
changed; retrain on new gold stars (a schedule, and the automation condition's sensor)."""

import json
import warnings

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    BetaWarning,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    schedule,
    sensor,
)

from resources import FileStore, LabelStudio, MetadataDB
from resources.label_studio import LabelStudioUnavailable, iso
from vbatch_pipelines.batch.service import (
    batches_to_settle,
    batches_without_run,
    end_batch,
)
from vbatch_pipelines.curation.service import latest_change, latest_dataset
from vbatch_pipelines.curation.sync import record_task
from vbatch_pipelines.fine_tuning.retraining import retraining_state
from vbatch_pipelines.fine_tuning.service import (
    fail_job,
    jobs_without_run,
    unfinished_jobs_with_run,
)
from vbatch_pipelines.jobs import (
    batch_job,
    fine_tuning_job,
    gold_star_dataset_job,
    installed_model_job,
    retraining_job,
)
from vbatch_pipelines.launch import (
    BATCH_ID_TAG,
    FINE_TUNING_JOB_TAG,
    fine_tuning_run_tags,
    run_tags,
)
from vbatch_pipelines.models.store import installs_without_run
from vbatch_pipelines.partitions import (
    batch_partitions,
    fine_tune_partitions,
    model_partitions,
)
from vbatch_pipelines.settings import load_settings

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


@sensor(job=fine_tuning_job, minimum_interval_seconds=5, default_status=DefaultSensorStatus.RUNNING)
def fine_tuning_sensor(context: SensorEvaluationContext, metadata_db: MetadataDB):
    """Fine-tuning jobs recorded without a run get one (run_key = job id: at most one, also for the jobs
    the retraining schedule and automation record); a job whose run ended without finishing it (the run
    crashed or was terminated in Dagster) is marked failed, so no job stays ``running`` forever."""
    db = metadata_db.db
    ended = []
    for job in unfinished_jobs_with_run(db):
        run = context.instance.get_run_by_id(job.dagster_run_id)
        if run is None or (run.status not in ACTIVE_RUN and run.status != DagsterRunStatus.SUCCESS):
            if fail_job(db, job.id, "run_ended", f"Its Dagster run {job.dagster_run_id} ended "
                                                  f"({run.status.value if run else 'missing'}) before the job finished"):
                ended.append(job.id)
    waiting = jobs_without_run(db, older_than_s=LAUNCH_GRACE_S)
    launch = [job_id for job_id in waiting
              if not context.instance.get_run_records(RunsFilter(tags={FINE_TUNING_JOB_TAG: job_id}), limit=1)]
    if not launch:
        return SkipReason(f"No fine-tuning job waiting for a run; {len(ended)} ended with their run")
    return SensorResult(
        run_requests=[RunRequest(run_key=j, partition_key=j, tags=fine_tuning_run_tags(j)) for j in launch],
        dynamic_partitions_requests=[fine_tune_partitions.build_add_request(launch)],
    )


@sensor(job=installed_model_job, minimum_interval_seconds=5, default_status=DefaultSensorStatus.RUNNING)
def model_install_sensor(context: SensorEvaluationContext, metadata_db: MetadataDB):
    """Installs accepted while Dagster was unreachable get their run (run_key: model id and request time)."""
    waiting = installs_without_run(metadata_db.db, older_than_s=LAUNCH_GRACE_S)
    if not waiting:
        return SkipReason("No install waiting for a run")
    return SensorResult(
        run_requests=[RunRequest(run_key=f"install-{row.id}-{row.updated_at}", partition_key=row.id,
                                 tags={"vbatch/model_id": row.id}) for row in waiting],
        dynamic_partitions_requests=[model_partitions.build_add_request([row.id for row in waiting])],
    )


def retraining_schedule(cron: str):
    @schedule(cron_schedule=cron, job=retraining_job, default_status=DefaultScheduleStatus.RUNNING,
              name="retraining_schedule")
    def _retraining_schedule(context: ScheduleEvaluationContext, metadata_db: MetadataDB):
        """Retrain on the schedule (VBATCH_RETRAIN_CRON) when any gold star arrived since the last fine-tune."""
        state = retraining_state(metadata_db.db)
        if not state.new_gold_stars:
            return SkipReason(f"No new gold stars since {state.trained_on or 'the start'}; nothing to retrain on")
        minimum = load_settings().min_training_examples
        if state.train_examples < minimum:
            return SkipReason(f"Dataset {state.latest_dataset} has {state.train_examples} training examples; "
                              f"retraining waits for {minimum} (VBATCH_MIN_TRAINING_EXAMPLES)")
        return RunRequest(run_key=f"retrain-{state.latest_dataset}", tags={"vbatch/trigger": "schedule"})

    return _retraining_schedule


with warnings.catch_warnings():
    warnings.simplefilter("ignore", BetaWarning)  # use_user_code_server: the condition reads vbatch's DB
    retraining_automation = AutomationConditionSensorDefinition(
        "retraining_automation",
        target=AssetSelection.keys("retraining_request"),
        use_user_code_server=True,
        default_status=DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
    )
