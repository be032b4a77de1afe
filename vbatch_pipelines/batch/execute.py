"""Run one validated batch to its end on the warm engine: what ``batch_output`` does, and what
``model_comparison`` does for its eval batches. Resumable; stops within a second of a cancel or expiry
and ends the batch with what finished."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vbatch_pipelines.batch.runner import BatchProgress, ResultFiles, run_batch_requests
from vbatch_pipelines.batch.service import (
    INPUT_FILE,
    claim_batch,
    end_batch,
    get_batch,
    iter_requests,
    lease_owner,
    now,
    parquet_row_count,
    release_batch,
    renew_lease,
    update_batch,
)
from vbatch_pipelines.models.registry import ModelSpec
from vbatch_pipelines.store.db import Database

STOP_STATUSES = ("cancelling", "cancelled")


@dataclass
class BatchRun:
    finished: bool
    stop_reason: str | None
    progress: BatchProgress
    wall: float
    results: ResultFiles
    backend: str


def execute_batch(db: Database, batch_id: str, directory: Path, inference_engine, model: ModelSpec, *,
                  log: Callable[[str], None], run_id: str | None = None) -> BatchRun:
    """Run the batch under its lease (one run at a time, whatever the pool size: two would append the same
    results twice); the lease is renewed every second and released at the end."""
    owner = lease_owner(run_id)
    claim_batch(db, batch_id, owner)
    try:
        return _execute(db, batch_id, directory, inference_engine, model, log=log, run_id=run_id, owner=owner)
    finally:
        release_batch(db, batch_id, owner)


def _execute(db: Database, batch_id: str, directory: Path, inference_engine, model: ModelSpec, *,
             log: Callable[[str], None], run_id: str | None, owner: str) -> BatchRun:
    input_path = directory / INPUT_FILE
    results = ResultFiles(directory)
    progress = BatchProgress(total=parquet_row_count(input_path))
    done = results.resume(progress)
    if done:
        log(f"{batch_id}: resuming, {len(done)} of {progress.total} requests already finished")
    update_batch(db, batch_id, status="in_progress", only_from=("validating", "in_progress"), dagster_run_id=run_id,
                 request_total=progress.total, request_completed=progress.completed,
                 request_failed=progress.failed)

    last_log = [0.0]

    def on_progress(p: BatchProgress) -> None:
        update_batch(db, batch_id, request_completed=p.completed, request_failed=p.failed)
        if time.monotonic() - last_log[0] >= 5 or p.finished == p.total:
            last_log[0] = time.monotonic()
            log(f"{batch_id}: {p.completed} completed, {p.failed} failed of {p.total}")

    stop_reason: list[str] = []

    def should_stop() -> bool:
        if not renew_lease(db, batch_id, owner):
            stop_reason.append("lease_lost")
            return True
        current = get_batch(db, batch_id)
        if current is None or current.status in STOP_STATUSES:
            stop_reason.append("cancelled")
        elif current.expires_at is not None and now() >= current.expires_at:
            stop_reason.append("expired")
        return bool(stop_reason)

    engine_backend = [""]

    async def run() -> bool:
        engine = inference_engine.open(model)
        engine_backend[0] = engine.backend
        log(f"{batch_id}: running on {engine.backend} engine for {model.id}")
        try:
            return await run_batch_requests(
                engine, get_batch(db, batch_id).endpoint, iter_requests(input_path, done, model.id), results,
                progress, concurrency=inference_engine.max_concurrency, chunk_size=inference_engine.chunk_size,
                should_stop=should_stop, on_progress=on_progress,
            )
        finally:
            await engine.aclose()

    started = time.monotonic()
    finished = False
    try:
        finished = asyncio.run(run())
    finally:
        results.close()
        if stop_reason == ["lease_lost"]:
            raise RuntimeError(f"{batch_id}: this run stalled past its lease and another run took the batch over; "
                               "it stopped without writing more")
        if not finished and (stop_reason or get_batch(db, batch_id).status == "cancelling"):
            ended = end_batch(db, directory, batch_id, stop_reason[0] if stop_reason else "cancelled")
            log(f"{batch_id}: {ended.status} with {ended.request_completed} completed, "
                f"{ended.request_failed} failed of {progress.total}")
    wall = time.monotonic() - started
    if finished:
        update_batch(db, batch_id, status="finalizing", only_from=("in_progress",))
        end_batch(db, directory, batch_id, "completed")
    return BatchRun(finished, (stop_reason[0] if stop_reason else "cancelled") if not finished else None,
                    progress, wall, results, engine_backend[0])


def run_lines(db: Database, file_store, inference_engine, name: str, lines: list[dict], model: ModelSpec, *,
              metadata: dict[str, str], log: Callable[[str], None],
              run_id: str | None = None) -> tuple[str, dict[str, str]]:
    """Run request lines as a batch of their own (recorded, downloadable through the Batches API like any
    other) inside the caller's run; returns the batch id and each custom_id's answer text."""
    import io
    import json

    from vbatch_pipelines.batch.service import create_batch, validate_input
    from vbatch_pipelines.files import store_file
    from vbatch_pipelines.protocol import response_text

    data = ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
    stored = store_file(db, file_store.files_dir, io.BytesIO(data), f"{name}.jsonl", "batch")
    batch = create_batch(db, input_file_id=stored.id, endpoint="/v1/chat/completions",
                         metadata={**metadata, "curation": "off"})
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
