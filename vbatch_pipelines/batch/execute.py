"""Run validated batches to their end on the warm engine: what ``batch_output`` does (for one batch, or for
the batches launched together in one run), and what ``model_comparison`` does for its eval batches.

The batches of one call run side by side in one event loop and share one engine per model, so the engine
batches their requests together. Each keeps its own lease, result files, progress and status: one ending,
being cancelled or failing never stops another. Resumable; a batch stops within a second of a cancel or
expiry and ends with what finished; a batch is marked completed as soon as its own requests are done.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vbatch_pipelines.batch.runner import BatchProgress, FinishedIds, ResultFiles, run_batch_requests
from vbatch_pipelines.batch.schedule import plan_requests
from vbatch_pipelines.batch.service import (
    INPUT_FILE,
    BatchRequestError,
    claim_batch,
    end_batch,
    fail_batch,
    get_batch,
    iter_request_tables,
    iter_requests,
    lease_owner,
    now,
    parquet_row_count,
    release_batch,
    renew_lease,
    update_batch,
)
from vbatch_pipelines.detached import ServerStartError
from vbatch_pipelines.models.registry import ModelSpec
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import DEFAULT_OWNER, Owner, Project

STOP_STATUSES = ("cancelling", "cancelled")
WATCH_EVERY_S = 1.0  # leases renewed, cancels and expiries seen, progress written
LOG_EVERY_S = 5.0
# A run being terminated whose interrupt has not arrived this long after (a Celery revoke is a broadcast, and
# one can be lost) stops its batches and ends as the launcher's signal would have made it.
TERMINATE_GRACE_S = 5.0
TERMINATED = "terminated"  # a job's stop reason when its run stops: the batch stays as it is, to be resumed


class RunTerminated(RuntimeError):
    """The run was being terminated and its interrupt never came: its batches stopped, resumable."""


@dataclass
class BatchRun:
    finished: bool
    stop_reason: str | None
    progress: BatchProgress
    wall: float
    results: ResultFiles
    backend: str


@dataclass
class _Job:
    """One batch of the call, from its lease to its end."""

    batch_id: str
    directory: Path
    model: ModelSpec
    owner: str
    results: ResultFiles = field(init=False)
    progress: BatchProgress = field(init=False)
    done: FinishedIds = field(default_factory=FinishedIds)
    endpoint: str = ""
    share: tuple[str, float] | None = None  # (project, weight): its turn in the engine's fair share
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: list[str] = field(default_factory=list)
    running: bool = False
    started: float = field(default_factory=time.monotonic)
    logged_at: float = 0.0
    written: tuple[int, int] = (-1, -1)

    def __post_init__(self) -> None:
        self.results = ResultFiles(self.directory)


def execute_batch(db: Database, batch_id: str, directory: Path, inference_engine, model: ModelSpec, *,
                  log: Callable[[str], None], run_id: str | None = None) -> BatchRun:
    """Run one batch (see ``execute_batches``); its exception, if any, is raised."""
    outcome = execute_batches(db, [(batch_id, directory, model)], inference_engine, log=log, run_id=run_id)[batch_id]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def execute_batches(db: Database, batches: list[tuple[str, Path, ModelSpec]], inference_engine, *,
                    log: Callable[[str], None], run_id: str | None = None,
                    terminating: Callable[[], bool] | None = None) -> dict[str, BatchRun | Exception]:
    """Run the batches side by side; returns each one's BatchRun, or the exception it ended with. Each runs
    under its lease (one run at a time per batch, whatever the pool size: two would append the same
    results twice), renewed every second and released at its end. ``log`` is called from this thread only.
    ``terminating`` says whether the Dagster run is being terminated: when it has been for TERMINATE_GRACE_S
    and no interrupt came, the batches stop (kept resumable) and RunTerminated is raised.

    SIGINT and SIGTERM, when this thread has a handler of its own for them (Dagster's, in a run), are taken
    by the event loop while the batches run: every batch stops, resumable, and the signal is then raised again
    for that handler. Left to Dagster's handler, the interrupt would be raised wherever the loop happened to
    be, and asyncio keeps an exception raised in a task or callback to itself: the run would go on."""
    if not batches:
        return {}
    owner = lease_owner(run_id)
    jobs = [_Job(batch_id, directory, model, owner) for batch_id, directory, model in batches]
    received: list[int] = []
    outcomes = asyncio.run(_run_all(db, jobs, inference_engine, log, run_id, terminating, received))
    if received:
        signal.raise_signal(received[0])  # every batch has stopped: the run's own handler interrupts it now
    return outcomes


def _catch_signals(loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None]) -> dict[int, object]:
    """Hand SIGINT/SIGTERM to the loop (``on_signal``) where this, the main, thread has a Python handler for
    them; returns the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    caught = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            caught[signum] = handler
            loop.add_signal_handler(signum, on_signal, signum)
    return caught


def _put_back(loop: asyncio.AbstractEventLoop, caught: dict[int, object]) -> None:
    for signum, handler in caught.items():
        loop.remove_signal_handler(signum)
        signal.signal(signum, handler)


def project_weight(db: Database, project_id: str) -> int:
    """A project's weight in the engine's fair share (1 for one not found)."""
    project = db.get(Project, project_id)
    return project.weight if project is not None else 1


def _start(db: Database, job: _Job, run_id: str | None) -> str | None:
    """Take the lease, read what earlier runs finished, mark the batch in progress; returns a log line."""
    claim_batch(db, job.batch_id, job.owner)
    job.progress = BatchProgress(total=parquet_row_count(job.directory / INPUT_FILE))
    job.done = job.results.resume(job.progress)
    batch = update_batch(db, job.batch_id, status="in_progress", only_from=("validating", "in_progress"),
                         dagster_run_id=run_id, request_total=job.progress.total,
                         request_completed=job.progress.completed, request_failed=job.progress.failed)
    job.endpoint = batch.endpoint
    job.share = (batch.project_id, float(project_weight(db, batch.project_id)))
    job.started = job.logged_at = time.monotonic()  # progress lines for batches that run 5 s and more
    if job.done:
        return f"{job.batch_id}: resuming, {len(job.done)} of {job.progress.total} requests already finished"
    return None


def _requests(job: _Job, plan: bool):
    """The batch's requests still to run: planned (batch.schedule), or in file order when ``plan`` is off."""
    path = job.directory / INPUT_FILE
    if not plan:
        return iter_requests(path, job.done, job.model.id)
    return plan_requests(job.endpoint, iter_request_tables(path, job.done), job.model.id)


def _watch(db: Database, jobs: list[_Job]) -> list[str]:
    """One round for the running batches: renew leases, write progress, see cancels and expiries."""
    lines = []
    for job in jobs:
        if not job.running or job.stop.is_set():
            continue
        p = job.progress
        if not renew_lease(db, job.batch_id, job.owner):
            job.stop_reason.append("lease_lost")
            continue
        current = get_batch(db, job.batch_id)
        if current is None or current.status in STOP_STATUSES:
            job.stop_reason.append("cancelled")
        elif current.expires_at is not None and now() >= current.expires_at:
            job.stop_reason.append("expired")
        if (p.completed, p.failed) != job.written:
            update_batch(db, job.batch_id, request_completed=p.completed, request_failed=p.failed)
            job.written = (p.completed, p.failed)
        if time.monotonic() - job.logged_at >= LOG_EVERY_S:
            job.logged_at = time.monotonic()
            lines.append(f"{job.batch_id}: {p.completed} completed, {p.failed} failed of {p.total}")
    return lines


class EngineCannotStart(BatchRequestError):
    """A batch failed because its engine cannot start: the batch's errors say why (the engine's own words)."""

    status = 503


def _engine_gave_up(failure: BaseException | None) -> ServerStartError | None:
    """The engine's start failure, when it failed to start again and again and vbatch stopped trying for now:
    a batch then fails saying why, rather than waiting on more retries that would fail alike."""
    if isinstance(failure, ServerStartError) and failure.retry_at is not None:
        return failure
    return None


def _finish(db: Database, job: _Job, finished: bool, stop_reason: list[str],
            engine_failure: ServerStartError | None = None) -> BatchRun:
    """Close the result files and end the batch: completed, or cancelled/expired with what finished, its
    lease freed in the same transaction, or failed when its engine cannot start (``engine_failure``).
    ``stop_reason`` is the job's as it stopped (the watcher may still be looking at it meanwhile)."""
    ended = False
    terminated = stop_reason[:1] == [TERMINATED]  # the run stopped, not the batch: it stays to be resumed
    try:
        job.results.close()
        if stop_reason == ["lease_lost"]:
            raise RuntimeError(f"{job.batch_id}: this run stalled past its lease and another run took the batch "
                               "over; it stopped without writing more")
        if finished:
            end_batch(db, job.directory, job.batch_id, "completed", progress=job.progress, lease_owner=job.owner)
            ended = True
        elif not terminated and (stop_reason or get_batch(db, job.batch_id).status == "cancelling"):
            end_batch(db, job.directory, job.batch_id, stop_reason[0] if stop_reason else "cancelled",
                      progress=job.progress, lease_owner=job.owner)
            ended = True
        elif engine_failure is not None:  # its lease is freed below
            fail_batch(db, job.directory, job.batch_id, engine_failure.code, engine_failure.message.rstrip("."),
                       "Create the batch again once the engine starts.")
            stop_reason = ["failed"]
        else:  # the run stopped short (its engine failed, or it was terminated): what finished is counted, a
            # later run resumes
            update_batch(db, job.batch_id, request_completed=job.progress.completed,
                         request_failed=job.progress.failed)
    finally:
        if not ended:
            release_batch(db, job.batch_id, job.owner)
    reason = None if finished else (stop_reason[0] if stop_reason else "cancelled")
    return BatchRun(finished, reason, job.progress, time.monotonic() - job.started, job.results, "")


async def _run_all(db: Database, jobs: list[_Job], inference_engine, log: Callable[[str], None],
                   run_id: str | None, terminating: Callable[[], bool] | None,
                   received: list[int]) -> dict[str, BatchRun | Exception]:
    outcomes: dict[str, BatchRun | Exception] = {}
    engines: dict[str, object] = {}
    opening: dict[str, asyncio.Task] = {}

    async def engine_for(model: ModelSpec):
        if model.id not in opening:  # one engine per model, shared by every batch on it
            opening[model.id] = asyncio.create_task(asyncio.to_thread(inference_engine.open, model))
        engine = await opening[model.id]
        if model.id not in engines:
            engines[model.id] = engine
            log(f"running on {engine.backend} engine for {model.id} ({engine.where})")
        return engine

    async def run(job: _Job) -> None:
        try:
            line = await asyncio.to_thread(_start, db, job, run_id)
        except Exception as exc:  # noqa: BLE001 - this batch's problem (busy, file gone); the others go on
            outcomes[job.batch_id] = exc
            await asyncio.to_thread(release_batch, db, job.batch_id, job.owner)
            return
        if line:
            log(line)
        finished = False
        try:
            engine = await engine_for(job.model)
            job.running = True
            finished = await run_batch_requests(
                engine, job.endpoint, _requests(job, inference_engine.plan_batches), job.results, job.progress,
                concurrency=inference_engine.max_concurrency, chunk_size=inference_engine.chunk_size,
                stop=job.stop, share=job.share)
        except Exception as exc:  # noqa: BLE001
            outcomes[job.batch_id] = exc
        finally:
            job.running = False
            stop_reason = [] if finished else list(job.stop_reason)
            gave_up = _engine_gave_up(outcomes.get(job.batch_id))
            try:
                ended = await asyncio.to_thread(_finish, db, job, finished, stop_reason, gave_up)
            except Exception as exc:  # noqa: BLE001
                outcomes.setdefault(job.batch_id, exc)
            else:
                ended.backend = getattr(engines.get(job.model.id), "backend", "")
                if gave_up is not None and ended.stop_reason == "failed":
                    outcomes[job.batch_id] = EngineCannotStart(gave_up.message, code=gave_up.code)
                outcomes.setdefault(job.batch_id, ended)

    async def watcher() -> None:
        terminating_since = None
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            try:
                lines = await asyncio.to_thread(_watch, db, jobs)
            except Exception as exc:  # noqa: BLE001 - the metadata DB hiccuped: look again next round
                lines = [f"could not check the batches' status this round: {exc}"]
            for line in lines:
                log(line)
            for job in jobs:
                if job.stop_reason:
                    job.stop.set()
            if terminating is not None and await asyncio.to_thread(_asks, terminating):
                terminating_since = terminating_since or time.monotonic()
                if time.monotonic() - terminating_since >= TERMINATE_GRACE_S:
                    log(f"the run is being terminated and no interrupt arrived in {TERMINATE_GRACE_S:.0f}s: "
                        "stopping its batches here")
                    stop_all(RunTerminated("the run was terminated"))
                    return

    def stop_all(reason: BaseException | None) -> None:
        interrupted.append(reason)
        for job in jobs:
            job.stop_reason.insert(0, TERMINATED)
            job.stop.set()

    async def watching() -> None:
        try:
            await watcher()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - an interrupt (Dagster's SIGINT) landed in this task: stop
            stop_all(exc)  # every batch as it would have, and raise it once they have stopped

    def on_signal(signum: int) -> None:
        if not received:
            log(f"{signal.Signals(signum).name}: stopping the batches (each resumes where it stopped)")
            received.append(signum)
            stop_all(None)

    interrupted: list[BaseException | None] = []
    loop = asyncio.get_running_loop()
    caught = _catch_signals(loop, on_signal)
    watch = asyncio.create_task(watching())
    try:
        await asyncio.gather(*(run(job) for job in jobs))
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        for engine in engines.values():
            await engine.aclose()
        _put_back(loop, caught)
    if interrupted and interrupted[0] is not None:
        raise interrupted[0]
    return outcomes


def _asks(terminating: Callable[[], bool]) -> bool:
    """``terminating()``, False when it cannot tell this round (the Dagster instance hiccuped)."""
    try:
        return terminating()
    except Exception:  # noqa: BLE001
        return False


def run_lines(db: Database, file_store, inference_engine, name: str, lines: list[dict], model: ModelSpec, *,
              metadata: dict[str, str], log: Callable[[str], None],
              run_id: str | None = None, owner: Owner = DEFAULT_OWNER) -> tuple[str, dict[str, str]]:
    """Run request lines as a batch of their own (``owner``'s: recorded, downloadable through the Batches API
    like any other) inside the caller's run; returns the batch id and each custom_id's answer text."""
    import io
    import json

    from vbatch_pipelines.batch.service import create_batch, validate_input
    from vbatch_pipelines.files import store_file
    from vbatch_pipelines.protocol import response_text

    data = ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
    stored = store_file(db, file_store.files_dir, io.BytesIO(data), f"{name}.jsonl", "batch", owner=owner)
    batch = create_batch(db, input_file_id=stored.id, endpoint="/v1/chat/completions",
                         metadata={**metadata, "curation": "off"}, owner=owner)
    update_batch(db, batch.id, dagster_run_id=run_id or "in-process")
    report = validate_input(db, batch, file_store.batch_dir(batch.id), resolve_model=lambda name: model.id)
    if not report.ok:
        raise ValueError(f"{batch.id}: the generated requests are invalid: {report.openai_errors()}")
    run = execute_batch(db, batch.id, file_store.batch_dir(batch.id), inference_engine, model, log=log,
                        run_id=run_id)
    if not run.finished:
        raise RuntimeError(f"{batch.id} was {run.stop_reason} before it finished")
    answers: dict[str, str] = {}
    if run.results.output_path.exists():
        with open(run.results.output_path) as f:
            for raw in f:
                line = json.loads(raw)
                answers[line["custom_id"]] = response_text(line["response"]["body"]) or ""
    return batch.id, answers
