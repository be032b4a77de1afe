"""Batches: a batch's validated input and its results (one partition per batch), the job that runs them
and sends them to review, and the sensors that launch batches accepted while Dagster was unreachable and
settle those whose run is gone."""

import errno
import json
import time
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetSelection,
    DagsterExecutionInterruptedError,
    DagsterRunStatus,
    DefaultSensorStatus,
    Definitions,
    Failure,
    MaterializeResult,
    MetadataValue,
    RetryRequested,
    RunRequest,
    RunsFilter,
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
from vbatch_pipelines.batch.execute import STOP_STATUSES, BatchRun, RunTerminated, execute_batches
from vbatch_pipelines.batch.runner import ResultFiles
from vbatch_pipelines.batch.service import (
    INPUT_FILE,
    LAUNCHING,
    BatchRequestError,
    batches_to_settle,
    end_batch,
    fail_batch,
    fail_batch_on_full_disk,
    get_batch,
    record_run,
    unfinished_batches_with_run,
    update_batch,
    validate_input,
    waiting_for_run,
)
from vbatch_pipelines.batch.validation import BatchInputError
from vbatch_pipelines.defs.runs import ACTIVE_RUN, without_run
from vbatch_pipelines.engine.base import EngineUnavailable
from vbatch_pipelines.instance import INFERENCE_POOL
from vbatch_pipelines.models.registry import ModelSpec
from vbatch_pipelines.names import BATCH_ID_TAG, BATCH_JOB, BATCH_LAUNCH_LOCK, RESCUE_TAG, batch_run_tags
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


def each_batch(context: AssetExecutionContext, outcomes: dict[str, dict | Failure]) -> MaterializeResult:
    """Record a step's outcome for every batch of its run (one batch, or a partition range of batches launched
    together): each batch's metadata goes to its own partition's materialization. A batch that failed does
    not fail its neighbours (its materialization says why); the step fails when none of its batches
    succeeded, so a one-batch run fails exactly as it always did."""
    failures = {key: outcome for key, outcome in outcomes.items() if isinstance(outcome, Failure)}
    if len(outcomes) == 1 and failures:
        raise next(iter(failures.values()))
    if failures and len(failures) == len(outcomes):
        raise Failure(f"All {len(outcomes)} batches failed: " + "; ".join(
            f"{key}: {failure.description}" for key, failure in list(failures.items())[:5]))
    for key, outcome in outcomes.items():
        metadata = {"failed": outcome.description or "", **outcome.metadata} if isinstance(outcome, Failure) \
            else outcome
        context.add_asset_metadata(metadata, partition_key=key)
    return MaterializeResult(metadata={"batches_in_run": len(outcomes)} if len(outcomes) > 1 else None)


def _outcome(work, *args) -> dict | Failure:
    try:
        return work(*args)
    except Failure as failure:
        return failure


def _validated_input(context: AssetExecutionContext, metadata_db: MetadataDB, file_store: FileStore,
                     model_registry: ModelRegistry, batch_id: str) -> dict:
    db = metadata_db.db
    batch = _batch_or_fail(metadata_db, batch_id)
    if batch.dagster_run_id != context.run_id:
        update_batch(db, batch_id, dagster_run_id=context.run_id)
    parquet = file_store.batch_dir(batch_id) / INPUT_FILE
    if batch.status == "in_progress" and parquet.exists():
        # The API validated this small file when the batch was created (its fast path): nothing to redo.
        return {"requests": batch.request_total, "model": batch.model or "", "endpoint": batch.endpoint,
                "input_file_id": batch.input_file_id, "validated_by": "api", "path": MetadataValue.path(str(parquet))}
    started = time.monotonic()
    try:
        report = validate_input(db, batch, file_store.batch_dir(batch_id), model_registry.resolver(batch.endpoint, batch.project_id))
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
    return {
        "requests": report.total,
        "model": report.model,
        "endpoint": batch.endpoint,
        "input_file_id": batch.input_file_id,
        "bytes": report.bytes_read,
        "validation_seconds": round(seconds, 3),
        "validated_by": "batch_input",
        "path": MetadataValue.path(str(parquet)),
    }


@asset(partitions_def=batch_partitions, group_name="batches", kinds={"parquet"})
def batch_input(context: AssetExecutionContext, metadata_db: MetadataDB, file_store: FileStore,
                model_registry: ModelRegistry) -> MaterializeResult:
    """The batch's JSONL input, stream-validated and stored as Parquet (one row per request)."""
    return each_batch(context, {key: _outcome(_validated_input, context, metadata_db, file_store, model_registry, key)
                                for key in context.partition_keys})


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
                text = response_text(body) or _pooling_summary(body)
                if text is None:
                    text = (body.get("error") or line.get("error") or {}).get("message", "")
                text = str(text).replace("|", "\\|").replace("\n", " ")[:120]
                lines.append(f"| {line['custom_id']} | {response.get('status_code', 'error')} | {text} |")
    return "\n".join(lines)


def _pooling_summary(body: dict) -> str | None:
    """An embeddings, score or rerank response in a few words (None for any other body)."""
    data = body.get("data") or [{}]
    if body.get("object") == "list" and "score" in data[0]:
        return "scores " + ", ".join(f"{item['score']:.4f}" for item in data[:8])
    if body.get("object") == "list":
        return f"{len(data)} embedding(s) of {len(data[0].get('embedding') or [])} values"
    if "results" in body:  # rerank: the documents best first
        return "ranked " + ", ".join(f"#{r['index']} {r['relevance_score']:.4f}" for r in body["results"][:8])
    return None


ENGINE_RETRIES = 3
# The engine or the metadata DB, not the batch, failed past the runner's own retries.
PLATFORM_ERRORS = (EngineUnavailable, OperationalError, InterfaceError)


@asset(
    partitions_def=batch_partitions,
    deps=[batch_input],
    pool=INFERENCE_POOL,
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
    """Every request run on the warm engine: OpenAI output and error JSONL files, resumable. The batches of
    one run run side by side, each under its own lease, with its own files, status and metadata."""
    db = metadata_db.db
    outcomes: dict[str, dict | Failure] = {}
    work: list[tuple[str, Path, ModelSpec]] = []
    for batch_id in context.partition_keys:
        try:
            batch = _batch_or_fail(metadata_db, batch_id)
            directory = file_store.batch_dir(batch_id)
            if not (directory / INPUT_FILE).exists():
                raise Failure(f"{directory / INPUT_FILE} is missing: materialize batch_input for {batch_id} first")
            work.append((batch_id, directory, model_registry.resolve(batch.model)))
        except Failure as failure:
            outcomes[batch_id] = failure
    try:
        runs = execute_batches(db, work, inference_engine, log=context.log.info, run_id=context.run_id,
                               terminating=lambda: _run_status(context) == DagsterRunStatus.CANCELING)
    except RunTerminated as exc:  # as the launcher's interrupt would have: Dagster then marks the run canceled
        raise DagsterExecutionInterruptedError(str(exc)) from exc
    retry = [f"{key}: {type(exc).__name__}: {exc}" for key, exc in runs.items() if isinstance(exc, PLATFORM_ERRORS)]
    if retry:
        # The step is retried after a pause; every batch resumes from its result files (nothing is redone,
        # nothing written twice) and a batch that completed meanwhile is reported as it is.
        context.log.warning(f"retrying the step: {'; '.join(retry[:3])}")
        raise RetryRequested(max_retries=ENGINE_RETRIES, seconds_to_wait=15) from next(
            exc for exc in runs.values() if isinstance(exc, PLATFORM_ERRORS))
    for batch_id, directory, model in work:
        outcomes[batch_id] = _output_outcome(db, batch_id, directory, model, runs[batch_id])
    context.log.info(_summary(outcomes))
    return each_batch(context, {key: outcomes[key] for key in context.partition_keys})


def _run_status(context: AssetExecutionContext) -> DagsterRunStatus | None:
    run = context.instance.get_run_by_id(context.run_id)
    return run.status if run is not None else None


def _summary(outcomes: dict[str, dict | Failure]) -> str:
    """One log line for the step: each batch's counts (its own materialization holds the rest)."""
    parts = []
    for key, outcome in outcomes.items():
        if isinstance(outcome, Failure):
            parts.append(f"{key}: {outcome.description}")
        else:
            parts.append(f"{key}: completed, {outcome['requests_completed']} completed and "
                         f"{outcome['requests_failed']} failed of {outcome['requests_total']}")
    return "; ".join(parts) if len(parts) <= 20 else f"{len(parts)} batches: " + "; ".join(parts[:20]) + "; ..."


def _output_outcome(db, batch_id: str, directory: Path, model: ModelSpec,
                    run: BatchRun | BaseException) -> dict | Failure:
    if isinstance(run, OSError) and run.errno in (errno.ENOSPC, errno.EDQUOT):
        # The disk is full: what was written stays (a torn last line is cut off), the batch fails saying so.
        ended = fail_batch_on_full_disk(db, directory, batch_id, str(run))
        return Failure(ended.errors["data"][0]["message"], allow_retries=False)
    if isinstance(run, BatchRequestError):  # e.g. another run holds the batch's lease
        return Failure(str(run))
    if isinstance(run, BaseException):
        raise run
    progress, wall = run.progress, run.wall
    if not run.finished:
        return Failure(f"Batch {batch_id} was {run.stop_reason} after {progress.finished} of {progress.total} "
                       "requests; finished results are kept")
    new_tokens = progress.completion_tokens - progress.completion_tokens_before
    ran = progress.finished - progress.done_before
    return {
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
    }


def build_batch_job(curation: bool):
    """Validate, run, and (with curation on) send results to review. In one process: the in-process executor
    saves ~2 s of subprocess start per step on small machines. With curation off, ``curation_tasks`` is left
    out: it would record a "skipped" materialization for every batch (a third of a batch run's events)."""
    selection = AssetSelection.assets(batch_input, batch_output)
    if curation:
        selection = selection | AssetSelection.keys("curation_tasks")
    return define_asset_job(
        BATCH_JOB, selection=selection, partitions_def=batch_partitions, executor_def=in_process_executor,
        description="Validate a batch's input file, run every request on the warm engine"
                    + (", send results to review." if curation else "."),
    )


# The API launches a batch as it is created; this is the fallback for a launch that failed (Dagster down),
# late enough never to split batches that concurrent creates are about to launch together.
BATCH_LAUNCH_GRACE_S = 30


@sensor(job_name=BATCH_JOB, minimum_interval_seconds=2, default_status=DefaultSensorStatus.RUNNING)
def batch_launch_sensor(context: SensorEvaluationContext, metadata_db: MetadataDB):
    """Batches recorded without a run for a while get one each (run_key = batch id: at most one). Under the
    lock the API's launches take, their partitions are added and they are marked as being launched."""
    db = metadata_db.db
    with db.lock(BATCH_LAUNCH_LOCK):
        waiting = [batch.id for batch in waiting_for_run(db, older_than_s=BATCH_LAUNCH_GRACE_S)]
        launch = without_run(context.instance, BATCH_ID_TAG, waiting)
        if not launch:
            return SkipReason(f"No batch waiting for a run ({len(waiting)} recorded without one already have runs)")
        context.instance.add_dynamic_partitions(
            batch_partitions.name, [key for key in launch
                                    if not context.instance.has_dynamic_partition(batch_partitions.name, key)])
        record_run(db, launch, LAUNCHING)  # batch_input records the run's id
    return SensorResult(run_requests=[RunRequest(run_key=b, partition_key=b, tags=batch_run_tags([b]))
                                      for b in launch])


# A batch its runs left unfinished (a run retried past Dagster's run retries, a batch that failed on its own
# inside a run with others) gets a run of its own this many times, then fails saying so.
MAX_RESCUES = 2
# Dagster's own run retry goes first: a run must have ended this long ago, with no retry running.
RESCUE_AFTER_S = 60


def _run_left_it(instance, run_id: str, ended_runs: dict) -> tuple[str, str, str] | None:
    """Whether the runs launched for a batch are all over: None while one of them (the run, or a retry of
    it) is active or ended less than ``RESCUE_AFTER_S`` ago, else (the last run's status, id and job)."""
    if run_id not in ended_runs:
        record = instance.get_run_record_by_id(run_id)
        if record is None:
            ended_runs[run_id] = ("missing", run_id, "")
        else:
            group = instance.get_run_group(run_id)
            ids = [run.run_id for run in group[1]] if group else [run_id]
            records = instance.get_run_records(RunsFilter(run_ids=ids))
            latest = max(records, key=lambda r: r.create_timestamp.timestamp())
            active = any(r.dagster_run.status in ACTIVE_RUN for r in records)
            recent = any(time.time() - (r.end_time or r.update_timestamp.timestamp()) < RESCUE_AFTER_S for r in records)
            ended_runs[run_id] = None if active or recent else (
                latest.dagster_run.status.value, latest.dagster_run.run_id, latest.dagster_run.job_name)
    return ended_runs[run_id]


@sensor(job_name=BATCH_JOB, minimum_interval_seconds=10, default_status=DefaultSensorStatus.RUNNING)
def batch_settle_sensor(context: SensorEvaluationContext, metadata_db: MetadataDB, file_store: FileStore):
    """No batch waits forever. A batch asked to cancel, or past its completion window, ends here when no run
    is working on it (never launched, crashed, or terminated); a running batch_output ends it itself within
    a second. A batch whose runs all ended without finishing it gets a run of its own (``MAX_RESCUES`` times,
    then it fails saying why, with what finished kept); one whose run was terminated in Dagster is cancelled."""
    db = metadata_db.db
    settled, rescue = [], []
    for batch in batches_to_settle(db):
        run = context.instance.get_run_by_id(batch.dagster_run_id) if batch.dagster_run_id else None
        if run is not None and run.status in ACTIVE_RUN:
            continue
        status = "cancelled" if batch.status == "cancelling" else "expired"
        end_batch(db, file_store.batch_dir(batch.id), batch.id, status)
        settled.append(f"{batch.id} {status}")
    ended_runs: dict = {}
    for batch in unfinished_batches_with_run(db):
        left = _run_left_it(context.instance, batch.dagster_run_id, ended_runs)
        if left is None:
            continue
        status, run_id, job = left
        directory = file_store.batch_dir(batch.id)
        if status == DagsterRunStatus.CANCELED.value:
            end_batch(db, directory, batch.id, "cancelled")
            settled.append(f"{batch.id} cancelled (its run {run_id} was terminated)")
        elif job != BATCH_JOB or len(context.instance.get_run_records(
                RunsFilter(tags={RESCUE_TAG: batch.id}))) >= MAX_RESCUES:
            # A batch another job ran inside its own run (a fine-tune's evaluation) ends with that run.
            again = f"; it was run again {MAX_RESCUES} times" if job == BATCH_JOB else ""
            fail_batch(db, directory, batch.id, "run_failed",
                       f"The Dagster run working on this batch ended without finishing it (the last, {run_id}, "
                       f"ended {status}{again})", "See the run's logs in the Dagster UI, then create the batch again.")
            settled.append(f"{batch.id} failed (its runs ended without finishing it)")
        else:
            context.log.info(f"{batch.id}: its run {run_id} ended ({status}) without finishing it; running it again")
            rescue.append(RunRequest(run_key=f"{batch.id}@{run_id}", partition_key=batch.id,
                                     tags={**batch_run_tags([batch.id]), RESCUE_TAG: batch.id}))
    if settled:
        context.log.info("settled: " + ", ".join(settled))
    if rescue:
        return SensorResult(run_requests=rescue)
    if not settled:
        return SkipReason("No batch to settle")
    return SkipReason(f"Settled {len(settled)} batch(es): {', '.join(settled)}")


def build_defs(curation: bool) -> Definitions:
    return Definitions(assets=[batch_input, batch_output], jobs=[build_batch_job(curation)],
                       sensors=[batch_launch_sensor, batch_settle_sensor])
