"""Files and batches as records: what the CLI, the REST API and the assets share.

A batch is a row in the metadata DB plus a directory ``$VBATCH_HOME/batches/<batch_id>/`` holding its
validated input (``input.parquet``) and results (``output.jsonl``, ``errors.jsonl``). The batch id is
also its Dagster partition key.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from vbatch_pipelines.batch.runner import BatchProgress, FinishedIds, ResultFiles, rows_of
from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.files import file_record, get_file
from vbatch_pipelines.protocol import SUPPORTED_ENDPOINTS
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import DEFAULT_OWNER, TERMINAL_BATCH_STATUSES, Batch, Owner

COMPLETION_WINDOWS = {"24h": 24 * 3600}
INPUT_FILE = "input.parquet"
MAX_METADATA_PAIRS = 16


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class BatchRequestError(VbatchError):
    """A request about a batch that cannot be accepted (HTTP 400 unless said otherwise)."""


def create_batch(db: Database, *, input_file_id: str, endpoint: str, completion_window: str = "24h",
                 metadata: dict[str, str] | None = None, output_expires_after: int | None = None,
                 owner: Owner = DEFAULT_OWNER) -> Batch:
    """Record a new batch of ``owner``'s (status ``validating``) on one of its project's files; the caller
    launches its run. Its output and error files expire ``output_expires_after`` seconds after they are written
    (None: the default retention)."""
    if endpoint not in SUPPORTED_ENDPOINTS:
        raise BatchRequestError(f"endpoint must be one of {', '.join(SUPPORTED_ENDPOINTS)}", "endpoint",
                                "invalid_value")
    if completion_window not in COMPLETION_WINDOWS:
        raise BatchRequestError("completion_window must be '24h'", "completion_window", "invalid_value")
    metadata = metadata or None
    if metadata is not None:
        if len(metadata) > MAX_METADATA_PAIRS:
            raise BatchRequestError("metadata takes at most 16 key-value pairs", "metadata")
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str) or len(key) > 64 or len(value) > 512:
                raise BatchRequestError("metadata keys are strings of at most 64 characters and values "
                                        "strings of at most 512", "metadata")
        if metadata.get("curation_schema"):
            from vbatch_pipelines.curation.schemas import UnknownSchema, get_schema

            try:
                get_schema(metadata["curation_schema"])
            except UnknownSchema as exc:
                raise BatchRequestError(str(exc), "metadata.curation_schema", "invalid_value") from exc
    input_file = get_file(db, input_file_id, owner.project_id)
    if input_file is None:
        raise BatchRequestError(f"No file with id {input_file_id!r}", "input_file_id", "file_not_found", 404)
    if input_file.purpose != "batch":
        raise BatchRequestError(f"File {input_file_id} has purpose {input_file.purpose!r}, not 'batch'",
                                "input_file_id", "invalid_file_purpose")
    created = now()
    batch = Batch(id=new_batch_id(), endpoint=endpoint, input_file_id=input_file_id,
                  completion_window=completion_window, status="validating", created_at=created,
                  expires_at=created + COMPLETION_WINDOWS[completion_window], metadata_=metadata,
                  request_total=0, request_completed=0, request_failed=0, output_expires_after=output_expires_after,
                  **owner.columns())
    with db.session() as session:
        session.add(batch)
    return batch


def validate_input(db: Database, batch: Batch, batch_dir: Path, resolve_model: Callable[[str | None], str]):
    """Validate the batch's input file into ``batch_dir/input.parquet`` and move the batch on: ``in_progress``
    (valid) or ``failed`` with OpenAI-style line errors. One code path for the API's fast path on small
    files, for ``batch_input`` and for comparison batches (which may name a fine-tune not yet deployed).
    ``resolve_model`` maps a requested model name to the served id (raising LookupError for an unknown
    one). Returns the ValidationReport."""
    from vbatch_pipelines.batch.validation import validate_batch_file

    source = get_file(db, batch.input_file_id)
    if source is None:
        raise BatchRequestError(f"Input file {batch.input_file_id} of batch {batch.id} no longer exists",
                                "input_file_id", "file_not_found", 404)
    report = validate_batch_file(source.path, endpoint=batch.endpoint,
                                 resolve_model=resolve_model,
                                 output=batch_dir / INPUT_FILE)
    if report.ok:
        update_batch(db, batch.id, status="in_progress", only_from=("validating",), model=report.model,
                     request_total=report.total)
    else:
        update_batch(db, batch.id, status="failed", only_from=("validating", "cancelling"),
                     errors=report.openai_errors(), request_total=report.total)
    return report


def get_batch(db: Database, batch_id: str) -> Batch | None:
    return db.get(Batch, batch_id)


def update_batch(db: Database, batch_id: str, *, only_from: tuple[str, ...] | None = None, **fields: Any) -> Batch:
    """Set fields on a batch; a ``status`` also stamps its ``<status>_at`` time once.

    Status changes are compare-and-set under the row lock: a batch that has ended keeps its status, and with
    ``only_from`` the status moves only from one of those (a run starting never writes ``in_progress`` over a
    ``cancelling`` that arrived meanwhile); the other fields are set either way."""
    with db.session() as session:
        batch = session.get(Batch, batch_id, with_for_update=True)
        if batch is None:
            raise KeyError(batch_id)
        _set_fields(batch, fields, only_from)
        return batch


def _set_fields(batch: Batch, fields: dict[str, Any], only_from: tuple[str, ...] | None = None) -> None:
    """``update_batch``'s rules, on a row its caller holds locked."""
    status = fields.get("status")
    if status is not None and (batch.status in TERMINAL_BATCH_STATUSES
                               or (only_from is not None and batch.status not in only_from)):
        fields = {key: value for key, value in fields.items() if key != "status"}
        status = None
    if status is not None:
        stamp = f"{status}_at"
        if hasattr(batch, stamp) and getattr(batch, stamp) is None and stamp not in fields:
            fields = {**fields, stamp: now()}
    for key, value in fields.items():
        setattr(batch, key, value)


LEASE_TTL_S = 30.0


class BatchBusy(BatchRequestError):
    """Another run holds the batch's lease: two runs appending to one result file would duplicate results."""

    def __init__(self, batch_id: str, holder: str | None):
        super().__init__(f"Batch {batch_id} is being run by {holder}; one run works on a batch at a time",
                         "batch_id", "batch_busy", 409)


def _take_lease(db: Database, batch_id: str, owner: str, ttl_s: float, *, renew_only: bool = False) -> bool:
    """One atomic UPDATE (the same on SQLite and PostgreSQL): the lease is ours if free, expired or ours."""
    stamp = time.time()
    held_by_us = Batch.lease_owner == owner
    free = held_by_us if renew_only else (Batch.lease_owner.is_(None) | held_by_us | (Batch.lease_until < stamp))
    with db.session() as session:
        result = session.execute(update(Batch).where(Batch.id == batch_id, free)
                                 .values(lease_owner=owner, lease_until=stamp + ttl_s))
        return result.rowcount == 1


def lease_owner(run_id: str | None) -> str:
    """Who holds a lease: the run, and the process on this host that works for it."""
    import os
    import socket

    return f"{(run_id or uuid.uuid4().hex)[:12]}@{socket.gethostname()[:40]}:{os.getpid()}"


def _dead_here(holder: str | None) -> bool:
    """Whether ``holder`` is a process of this host that no longer runs (its lease need not run out)."""
    import socket

    from vbatch_pipelines.detached import pid_alive

    if not holder or "@" not in holder:
        return False
    host, _, pid = holder.rpartition("@")[2].rpartition(":")
    return host == socket.gethostname()[:40] and pid.isdigit() and not pid_alive(int(pid))


def claim_batch(db: Database, batch_id: str, owner: str, *, ttl_s: float = LEASE_TTL_S,
                wait_s: float | None = None) -> None:
    """Take the batch's lease before running it. A lease held by a dead process of this host is taken at
    once; one held elsewhere runs out after ``ttl_s``, so by default this waits that long (and a little)
    before giving up with BatchBusy."""
    deadline = time.monotonic() + (ttl_s + 5 if wait_s is None else wait_s)
    while not _take_lease(db, batch_id, owner, ttl_s):
        holder = get_batch(db, batch_id).lease_owner
        if _dead_here(holder):
            with db.session() as session:
                session.execute(update(Batch).where(Batch.id == batch_id, Batch.lease_owner == holder)
                                .values(lease_owner=None, lease_until=None))
            continue
        if time.monotonic() >= deadline:
            raise BatchBusy(batch_id, holder)
        time.sleep(0.5)


def renew_lease(db: Database, batch_id: str, owner: str, ttl_s: float = LEASE_TTL_S) -> bool:
    """Extend our lease; False when it was lost (we stalled past its end and another run took over)."""
    return _take_lease(db, batch_id, owner, ttl_s, renew_only=True)


def release_batch(db: Database, batch_id: str, owner: str) -> None:
    with db.session() as session:
        session.execute(update(Batch).where(Batch.id == batch_id, Batch.lease_owner == owner)
                        .values(lease_owner=None, lease_until=None))


LAUNCHING = "launching"  # dagster_run_id while the launch sensor's run request becomes a run


def waiting_for_run(db: Database, *, older_than_s: float | None = None) -> list[Batch]:
    """Batches accepted and not launched yet, oldest first. With ``older_than_s`` (the launch sensor's view,
    for batches whose launch failed), also those the sensor already requested a run for, which it checks
    against the runs that exist."""
    query = select(Batch).where(Batch.status.in_(("validating", "in_progress")))
    if older_than_s is None:
        query = query.where(Batch.dagster_run_id.is_(None))
    else:
        query = query.where((Batch.dagster_run_id.is_(None)) | (Batch.dagster_run_id == LAUNCHING),
                            Batch.created_at <= now() - older_than_s)
    with db.session() as session:
        return list(session.scalars(query.order_by(Batch.created_at, Batch.id)))


def record_run(db: Database, batch_ids: list[str], run_id: str) -> None:
    """The run launched (or, ``LAUNCHING``, requested) for these batches."""
    with db.session() as session:
        session.execute(update(Batch).where(Batch.id.in_(batch_ids)).values(dagster_run_id=run_id))


def is_terminal(status: str) -> bool:
    return status in TERMINAL_BATCH_STATUSES


def iter_request_tables(parquet_path: Path, skip: Iterable[str]) -> Iterator:
    """The requests not in ``skip`` (FinishedIds, or any custom_ids), in file order, as Arrow tables of
    (custom_id, body as JSON): one per Parquet row group. A run holds its requests as Arrow buffers and makes
    Python objects of a few thousand at a time (``rows_of``)."""
    import pyarrow.parquet as pq

    finished = FinishedIds.of(skip)
    parquet = pq.ParquetFile(parquet_path)
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group, columns=["custom_id", "body"])
        if len(finished):
            table = table.filter(finished.to_run(table.column("custom_id")))
        if len(table):
            yield table


def iter_requests(parquet_path: Path, skip: Iterable[str], model: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(custom_id, body) for requests not in ``skip``, in file order, each body's ``model`` set to ``model``."""
    import json

    for table in iter_request_tables(parquet_path, skip):
        for custom_id, body in rows_of(table, "custom_id", "body"):
            request = json.loads(body)
            request["model"] = model
            yield custom_id, request


def parquet_row_count(parquet_path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(parquet_path).metadata.num_rows


def request_cancel(db: Database, batch_id: str) -> Batch:
    """Ask a batch to stop: ``cancelling`` until its run notices (within a second) and ends it as
    ``cancelled`` keeping what finished; a batch with no run yet is cancelled at once."""
    with db.session() as session:
        batch = session.get(Batch, batch_id, with_for_update=True)
        if batch is None:
            raise KeyError(batch_id)
        if batch.status in TERMINAL_BATCH_STATUSES:
            raise BatchRequestError(f"Cannot cancel a batch with status '{batch.status}'", "batch_id",
                                    "batch_not_cancellable", 409)
        stamp = now()
        if batch.cancelling_at is None:
            batch.cancelling_at = stamp
        if batch.dagster_run_id is None:
            batch.status, batch.cancelled_at = "cancelled", stamp
        else:
            batch.status = "cancelling"
        return batch


def end_batch(db: Database, directory: Path, batch_id: str, status: str, *,
              progress: BatchProgress | None = None, lease_owner: str | None = None) -> Batch:
    """Finish a batch as completed, cancelled or expired from what is on disk: requests not finished
    by expiry get ``batch_expired`` error lines (OpenAI's semantics), the output and error JSONL are
    recorded as files (purpose batch_output), counts and usage are summed from them.

    A run that wrote the files passes what it counted as ``progress`` (they are then not read back: for a
    100k-request batch that is seconds of parsing) and its ``lease_owner``, freed in the same transaction:
    a run ending 20 batches at once paid six metadata-DB commits for each."""
    results = ResultFiles(directory)
    if progress is None or status == "expired":
        progress = BatchProgress(total=0)
        done = results.resume(progress)
        if status == "expired" and (directory / INPUT_FILE).exists():
            for table in iter_request_tables(directory / INPUT_FILE, done):
                for custom_id in table.column("custom_id").to_pylist():
                    results.write_error(custom_id, "batch_expired",
                                        "This request could not be executed before the completion window expired.")
                    progress.failed += 1
    results.close()
    return _end(db, batch_id, results, lease_owner, {
        "status": status,
        "request_completed": progress.completed,
        "request_failed": progress.failed,
        "usage": {
            "input_tokens": progress.prompt_tokens,
            "output_tokens": progress.completion_tokens,
            "total_tokens": progress.prompt_tokens + progress.completion_tokens,
            # Lines answered with an identical line's response (batch.schedule): their input counted as cached,
            # and what was copied, beside OpenAI's fields.
            "input_tokens_details": {"cached_tokens": progress.copied_prompt_tokens},
            "output_tokens_details": {"reasoning_tokens": 0},
            "copied": {"requests": progress.copied, "input_tokens": progress.copied_prompt_tokens,
                       "output_tokens": progress.copied_completion_tokens},
        },
    })


def _end(db: Database, batch_id: str, results: ResultFiles, lease_owner: str | None, fields: dict[str, Any]) -> Batch:
    """One transaction: the batch's result files registered (purpose batch_output, those not yet), its fields
    set, and its lease freed when ``lease_owner`` holds it."""
    with db.session() as session:
        batch = session.get(Batch, batch_id, with_for_update=True)
        if batch is None:
            raise KeyError(batch_id)
        fields = dict(fields)
        was_running = batch.status not in TERMINAL_BATCH_STATUSES
        for path, name, field in ((results.output_path, "output", "output_file_id"),
                                  (results.error_path, "error", "error_file_id")):
            if getattr(batch, field) is None and path.exists() and path.stat().st_size:
                record = file_record(path, f"{batch_id}_{name}.jsonl", "batch_output",
                                     expires_after=batch.output_expires_after, owner=Owner.of(batch))
                session.add(record)
                fields[field] = record.id
        _set_fields(batch, fields)
        if batch.status == "completed" and batch.finalizing_at is None:
            batch.finalizing_at = batch.completed_at  # results were final as they were written
        if lease_owner is not None and batch.lease_owner == lease_owner:
            batch.lease_owner, batch.lease_until = None, None
        if was_running and batch.status in TERMINAL_BATCH_STATUSES:  # its usage, once, as it ends
            from vbatch_pipelines.usage import batch_usage

            session.add(batch_usage(batch, now()))
        return batch


def fail_batch(db: Database, directory: Path, batch_id: str, code: str, reason: str, advice: str) -> Batch:
    """Fail a batch that cannot go on, keeping every whole result line it wrote (a torn last one is cut):
    they are counted, recorded as its output and error files, and the error says how many were kept."""
    results = ResultFiles(directory)
    progress = BatchProgress(total=0)
    results.resume(progress)  # truncates a torn last line (which frees space on a full disk too)
    message = (f"{reason}; {progress.completed} completed and {progress.failed} failed results were written "
               f"and are kept. {advice}")
    return _end(db, batch_id, results, None, {
        "status": "failed", "request_completed": progress.completed, "request_failed": progress.failed,
        "errors": {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]}})


def fail_batch_on_full_disk(db: Database, directory: Path, batch_id: str, reason: str) -> Batch:
    """The disk filled up mid-run: fail the batch saying so and how much was kept."""
    return fail_batch(db, directory, batch_id, "disk_full", f"The disk holding {directory} is full ({reason})",
                      "Free space and create the batch again.")


def unfinished_batches_with_run(db: Database) -> list[Batch]:
    """Batches a run was launched for that have not ended, and whose lease no live run holds: either a run
    is about to take them, or the runs launched for them ended without finishing them."""
    with db.session() as session:
        return list(session.scalars(select(Batch).where(
            Batch.status.in_(("validating", "in_progress", "finalizing")),
            Batch.dagster_run_id.is_not(None), Batch.dagster_run_id != LAUNCHING,
            Batch.lease_owner.is_(None) | (Batch.lease_until < time.time()),
        )))


def batches_to_settle(db: Database) -> list[Batch]:
    """Batches asked to cancel, or past their completion window, that have not ended yet."""
    with db.session() as session:
        return list(session.scalars(select(Batch).where(
            Batch.status.not_in(TERMINAL_BATCH_STATUSES),
            (Batch.status == "cancelling") | (Batch.expires_at <= now()),
        )))
