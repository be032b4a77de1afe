"""Names other processes use to find vbatch's Dagster objects: job names, run tag keys, the code
location. Defined once here; the definitions, the sensors, the launcher and the API all import them.
(Partition set names come from the partition objects in ``partitions.py``.)"""

from __future__ import annotations

LOCATION_NAME = "vbatch"  # workspace.yaml's location_name
REPOSITORY_NAME = "__repository__"

BATCH_JOB = "batch_job"
GOLD_STAR_DATASET_JOB = "gold_star_dataset_job"
FINE_TUNING_JOB = "fine_tuning_job"
INSTALL_MODEL_JOB = "installed_model_job"
RETRAINING_JOB = "retraining_job"
EVAL_SCORE_JOB = "eval_score_job"

PARTITION_TAG = "dagster/partition"  # Dagster's own
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"  # Dagster's own
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"  # Dagster's own
SCHEDULE_NAME_TAG = "dagster/schedule_name"  # Dagster's own
SENSOR_NAME_TAG = "dagster/sensor_name"  # Dagster's own
BATCH_ID_TAG = "vbatch/batch_id"
BATCH_COUNT_TAG = "vbatch/batches"
RESCUE_TAG = "vbatch/rescue_of"  # a run the settle sensor launched for a batch its runs left unfinished
FINE_TUNING_JOB_TAG = "vbatch/fine_tuning_job_id"
MODEL_ID_TAG = "vbatch/model_id"
EVAL_RUN_TAG = "vbatch/eval_run_id"
CURATION_SEQ_TAG = "vbatch/curation_seq"
PROJECT_TAG = "vbatch/project"  # the vbatch project a run works for (a dataset build, a retrain)
TRIGGER_TAG = "vbatch/trigger"
RUN_WORKER_PID_TAG = "vbatch/run_worker_pid"
RUN_WORKER_STARTED_TAG = "vbatch/run_worker_started"
# Cluster mode: the Celery queue a run went to (dagster-celery's own tag), and who ran it (set as it starts).
CELERY_QUEUE_TAG = "dagster-celery/queue"  # dagster-celery's own
NODE_TAG = "vbatch/node"
CELERY_WORKER_TAG = "vbatch/celery_worker"  # the Celery worker's hostname, e.g. default@node-a
CELERY_WORKER_PID_TAG = "vbatch/celery_worker_pid"  # the pool process that executed the run


# Batches launched together share a run over their partition range, up to this many (and the lock that
# keeps their partitions contiguous).
MAX_BATCHES_PER_RUN = 100
BATCH_LAUNCH_LOCK = "batch-launch"


def batch_run_tags(batch_ids: list[str]) -> dict[str, str]:
    """One batch: its partition. Several (added to the partitions in a row): their partition range."""
    if len(batch_ids) == 1:
        return {PARTITION_TAG: batch_ids[0], BATCH_ID_TAG: batch_ids[0]}
    return {PARTITION_RANGE_START_TAG: batch_ids[0], PARTITION_RANGE_END_TAG: batch_ids[-1],
            BATCH_COUNT_TAG: str(len(batch_ids))}


def fine_tuning_run_tags(job_id: str) -> dict[str, str]:
    return {PARTITION_TAG: job_id, FINE_TUNING_JOB_TAG: job_id}


def eval_run_tags(run_id: str, eval_id: str, model: str) -> dict[str, str]:
    """A (set, model) partition's run: Dagster's multi-partition tags, each dimension's too."""
    return {PARTITION_TAG: f"{eval_id}|{model}", f"{PARTITION_TAG}/eval_set": eval_id,
            f"{PARTITION_TAG}/model": model, EVAL_RUN_TAG: run_id}


def install_run_tags(model_id: str) -> dict[str, str]:
    return {PARTITION_TAG: model_id, MODEL_ID_TAG: model_id}

# Set by `vbatch up` on the processes the first batch goes through, so they pay their first-use costs as they
# start: the Dagster webserver's run launcher starts its warm run workers as it is made (and `vbatch up` has it
# made before it says it is up: dagster_api.warm_up_runs); the API opens the Dagster instance it launches with.
WARM_AT_START_ENV = "VBATCH_WARM_AT_START"

# A process running batch steps (a run worker, a Celery worker) gives back what a batch's step reads through
# (Parquet row groups, windows of requests, result lines) as it frees it: Arrow allocates from the system
# allocator, not its own (mimalloc keeps what it took), and glibc serves blocks from 128 KiB up by mmap, each
# returned when freed (its default threshold grows with every such block freed, and the blocks after it stay in
# the heap). Half of a 1,000,000-request batch, the step alone (batch.runner with an instant engine): 225 -> 169 MB
# at its peak. The process's own environment wins.
STEP_MEMORY_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
