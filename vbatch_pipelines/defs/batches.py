"""Batches: a batch's validated input and its results (one partition per batch), the job that runs them
and sends them to review, and the sensors that launch batches accepted while Dagster was unreachable and
settle those whose run is gone."""

import errno
import json
import time

from dagster import (
    AssetExecutionContext,
    AssetSelection,
    DefaultSensorStatus,
    Definitions,
    Failure,
    MaterializeResult,
    MetadataValue,
    RetryRequested,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    asset,
    define_asset_job,
    in_process_executor,
    sensor,
)
from sqlalchemy.exc import InterfaceError, OperationalError

from resources import FileStore, InferenceEngine, MetadataDB, ModelRegistry
from vbatch_pipelines.batch.execute import STOP_STATUSES, execute_batch
from vbatch_pipelines.batch.runner import ResultFiles
from vbatch_pipelines.batch.service import (
    INPUT_FILE,
    BatchRequestError,
    batches_to_settle,
    batches_without_run,
    end_batch,
    fail_batch_on_full_disk,
    get_batch,
    update_batch,
    validate_input,
)
from vbatch_pipelines.batch.validation import BatchInputError
from vbatch_pipelines.defs.runs import ACTIVE_RUN, LAUNCH_GRACE_S, without_run
from vbatch_pipelines.engine.base import EngineUnavailable
from vbatch_pipelines.names import BATCH_ID_TAG, BATCH_JOB, batch_run_tags
from vbatch_pipelines.partitions import batch_partitions
from vbatch_pipelines.protocol import response_text


def _batch_or_fail(metadata_db: MetadataDB, batch_id: str):
    batch = get_batch(metadata_db.db, batch_id)
    if batch is None:
        raise Failure(f"Batch {batch_id} is not in the metadata DB; create it with launch_batch or the API")
    if batch.status in STOP_STATUSES:
        update_batch(metadata_db.db, batch_id, status="cancelled")
        raise Failure(f"Batch {batch_id} was cancelled; nothing to run")
    if batch.status in ("expired", "failed", "completed"):
        raise Failure(f"Batch {batch_id} has ended ({batch.status}); create a new batch to run it again")
    return batch


@asset(partitions_def=batch_partitions, group_name="batches", kinds={"parquet"})
def batch_input(context: AssetExecutionContext, metadata_db: MetadataDB, file_store: FileStore,
                model_registry: ModelRegistry) -> MaterializeResult:
    """The batch's JSONL input, stream-validated and stored as Parquet (one row per request)."""
    batch_id = context.partition_key
    db = metadata_db.db
    batch = _batch_or_fail(metadata_db, batch_id)
    update_batch(db, batch_id, dagster_run_id=context.run_id)
    parquet = file_store.batch_dir(batch_id) / INPUT_FILE
    if batch.status == "in_progress" and parquet.exists():
        # The API validated this small file when the batch was created (its fast path): nothing to redo.
        context.log.info(f"{batch_id}: {batch.request_total} valid requests (validated by the API)")
        return MaterializeResult(metadata={
            "requests": batch.request_total, "model": batch.model or "", "endpoint": batch.endpoint,
            "input_file_id": batch.input_file_id, "validated_by": "api", "path": MetadataValue.path(str(parquet)),
        })
    started = time.monotonic()
    try:
        report = validate_input(db, batch, file_store.batch_dir(batch_id), model_registry.served_id)
    except BatchRequestError as exc:
        raise Failure(str(exc)) from exc
    seconds = time.monotonic() - started
    if not report.ok:
        error = BatchInputError(report)
        raise Failure(str(error), metadata={
            "errors": MetadataValue.json(report.openai_errors()),
            "error_count": report.error_count,
        })
    context.log.info(f"{batch_id}: {report.total} valid requests for {report.model} in {seconds:.2f}s")
    return MaterializeResult(metadata={
        "requests": report.total,
        "model": report.model,
        "endpoint": batch.endpoint,
        "input_file_id": batch.input_file_id,
        "bytes": report.bytes_read,
        "validation_seconds": round(seconds, 3),
        "validated_by": "batch_input",
        "path": MetadataValue.path(str(parquet)),
    })


def _preview(results: ResultFiles, rows: int = 5) -> str:
    lines = ["| custom_id | status | response |", "|---|---|---|"]
    for path in (results.output_path, results.error_path):
        if not path.exists():
            continue
        with open(path) as f:
            for raw in f:
                if len(lines) >= rows + 2:
                    break
                line = json.loads(raw)
                response = line.get("response") or {}
                body = response.get("body") or {}
                text = response_text(body)
                if text is None:
                    text = (body.get("error") or line.get("error") or {}).get("message", "")
                text = str(text).replace("|", "\\|").replace("\n", " ")[:120]
                lines.append(f"| {line['custom_id']} | {response.get('status_code', 'error')} | {text} |")
    return "\n".join(lines)


ENGINE_RETRIES = 3


@asset(
    partitions_def=batch_partitions,
    deps=[batch_input],
    pool="gpu",
    group_name="batches",
    kinds={"vllm", "jsonl"},
)
def batch_output(
    context: AssetExecutionContext,
    metadata_db: MetadataDB,
    file_store: FileStore,
    model_registry: ModelRegistry,
    inference_engine: InferenceEngine,
) -> MaterializeResult:
    """Every request run on the warm engine: OpenAI output and error JSONL files, resumable."""
    batch_id = context.partition_key
    db = metadata_db.db
    batch = _batch_or_fail(metadata_db, batch_id)
    directory = file_store.batch_dir(batch_id)
    input_path = directory / INPUT_FILE
    if not input_path.exists():
        raise Failure(f"{input_path} is missing: materialize batch_input for {batch_id} first")
    model = model_registry.resolve(batch.model)
    try:
        run = execute_batch(db, batch_id, directory, inference_engine, model, log=context.log.info,
                            run_id=context.run_id)
    except (EngineUnavailable, OperationalError, InterfaceError) as exc:
        # The engine or the metadata DB, not the batch, failed past the runner's own retries: the step is
        # retried after a pause and resumes from the result files (nothing is redone, nothing written twice).
        context.log.warning(f"{batch_id}: {type(exc).__name__}: {exc}; retrying the step")
        raise RetryRequested(max_retries=ENGINE_RETRIES, seconds_to_wait=15) from exc
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # The disk is full: what was written stays (a torn last line is cut off), the batch fails saying so.
        ended = fail_batch_on_full_disk(db, directory, batch_id, str(exc))
        raise Failure(ended.errors["data"][0]["message"], allow_retries=False) from exc
    progress, wall = run.progress, run.wall
    if not run.finished:
        raise Failure(f"Batch {batch_id} was {run.stop_reason} after {progress.finished} of {progress.total} "
                      "requests; finished results are kept")
    new_tokens = progress.completion_tokens - progress.completion_tokens_before
    ran = progress.finished - progress.done_before
    return MaterializeResult(metadata={
        "model": model.id,
        "engine": run.backend,
        "requests_total": progress.total,
        "requests_completed": progress.completed,
        "requests_failed": progress.failed,
        "requests_resumed": progress.done_before,
        "prompt_tokens": progress.prompt_tokens,
        "completion_tokens": progress.completion_tokens,
        "wall_seconds": round(wall, 3),
        "requests_per_second": round(ran / wall, 2) if wall > 0 else 0.0,
        "output_tokens_per_second": round(new_tokens / wall, 2) if wall > 0 else 0.0,
        "output_path": MetadataValue.path(str(run.results.output_path)),
        "preview": MetadataValue.md(_preview(run.results)),
    })


# The in-process executor saves ~2 s of subprocess start per step on small machines.
batch_job = define_asset_job(
    BATCH_JOB,
    selection=AssetSelection.assets(batch_input, batch_output) | AssetSelection.keys("curation_tasks"),
    partitions_def=batch_partitions,
    executor_def=in_process_executor,
    description="Validate a batch's input file, run every request on the warm engine, send results to review.",
)


@sensor(job=batch_job, minimum_interval_seconds=2, default_status=DefaultSensorStatus.RUNNING)
def batch_launch_sensor(context: SensorEvaluationContext, metadata_db: MetadataDB):
    """Batches recorded without a run for a few seconds get one (run_key = batch id: at most one)."""
    waiting = batches_without_run(metadata_db.db, older_than_s=LAUNCH_GRACE_S)
    launch = without_run(context.instance, BATCH_ID_TAG, waiting)
    if not launch:
        return SkipReason(f"No batch waiting for a run ({len(waiting)} recorded without one already have runs)")
    return SensorResult(
        run_requests=[RunRequest(run_key=b, partition_key=b, tags=batch_run_tags(b)) for b in launch],
        dynamic_partitions_requests=[batch_partitions.build_add_request(launch)],
    )


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


defs = Definitions(assets=[batch_input, batch_output], jobs=[batch_job],
                   sensors=[batch_launch_sensor, batch_settle_sensor])
