"""Retention and disk (issue 26): what the retention job deletes, and how full the store's disk is.

- Files expire at their own ``expires_at`` (OpenAI's ``expires_after``), or, for batch input and output files that
  set none, ``created_at`` plus the retention days; each goes through ``files.delete_file`` (record and bytes), so a
  batch that has not finished never loses its input. A finished batch's directory goes once its files have.
- Finished Dagster runs older than the run retention are deleted with their event logs and compute logs through
  the instance's own API; a run that has not finished is never touched.
- Service and engine logs (written by children through an O_APPEND descriptor) rotate by size: copied to
  ``<name>.log.1`` (older copies shifted, ``keep`` of them kept), then truncated in place, so the writer carries on
  at the start of the same file.
- ``disk_usage`` measures the store by kind (cached a short while: it walks directories) and the free space of its
  filesystem; ``require_free_disk`` refuses new work under the free-space floor (507), leaving what was accepted.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from vbatch_pipelines.errors import NotFound, VbatchError
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import TERMINAL_BATCH_STATUSES, Batch, File

DAY_S = 86400
# Purposes that expire after the retention days when they set no expiry of their own (as OpenAI's batch files)
DEFAULT_EXPIRY_PURPOSES = ("batch", "batch_output")


# -- files --------------------------------------------------------------------------------------------------------


def file_expires_at(created_at: int, purpose: str, expires_at: int | None, retention_days: int | None) -> int | None:
    """When a file expires: its own expiry, else its purpose's default (None: kept until deleted)."""
    if expires_at is not None:
        return expires_at
    if retention_days is None or purpose not in DEFAULT_EXPIRY_PURPOSES:
        return None
    return created_at + retention_days * DAY_S


def expired(now: int, retention_days: int | None):
    """The SQL condition of ``file_expires_at(...) <= now``."""
    condition = File.expires_at <= now
    if retention_days is not None:
        condition = condition | (File.expires_at.is_(None) & File.purpose.in_(DEFAULT_EXPIRY_PURPOSES)
                                 & (File.created_at <= now - retention_days * DAY_S))
    return condition


@dataclass
class FileSweep:
    deleted: int = 0
    bytes: int = 0
    in_use: list[str] = field(default_factory=list)  # expired, but the input of a batch that has not finished


def expire_files(db: Database, retention_days: int | None, now: int) -> FileSweep:
    """Delete every expired file (record and bytes), oldest first, except inputs of unfinished batches."""
    from vbatch_pipelines.files import FileInUse, delete_file

    with db.session() as session:
        ids = list(session.scalars(select(File.id).where(expired(now, retention_days)).order_by(File.created_at)))
    sweep = FileSweep()
    for file_id in ids:
        try:
            record = delete_file(db, file_id)
        except FileInUse:
            sweep.in_use.append(file_id)
        except NotFound:  # deleted meanwhile (the API, another sweep)
            continue
        else:
            sweep.deleted += 1
            sweep.bytes += record.bytes
    return sweep


def remove_spent_batch_dirs(db: Database, batches_dir: Path) -> tuple[int, int]:
    """Remove the directory (validated input, result files) of each finished batch none of whose files (input,
    output, error) is left; its record stays. Returns (directories, bytes)."""
    if not batches_dir.is_dir():
        return 0, 0
    with os.scandir(batches_dir) as entries:
        names = [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
    removed = freed = 0
    for start in range(0, len(names), 500):
        with db.session() as session:
            rows = session.execute(select(Batch.id, Batch.input_file_id, Batch.output_file_id, Batch.error_file_id)
                                   .where(Batch.id.in_(names[start:start + 500]),
                                          Batch.status.in_(TERMINAL_BATCH_STATUSES))).all()
            ids = {file_id for row in rows for file_id in row[1:] if file_id}
            alive = set(session.scalars(select(File.id).where(File.id.in_(ids)))) if ids else set()
        for batch_id, *file_ids in rows:
            if not alive.intersection(file_ids):
                directory = batches_dir / batch_id  # a name read from the directory itself, matched to a record
                size = tree_bytes(directory)
                shutil.rmtree(directory, ignore_errors=True)
                removed, freed = removed + 1, freed + size
    return removed, freed


# -- Dagster runs -------------------------------------------------------------------------------------------------


def prune_runs(instance, older_than_days: int, now: float, *, page: int = 200) -> list[str]:
    """Delete finished runs (succeeded, failed, cancelled) created more than ``older_than_days`` ago, with their
    event logs (``DagsterInstance.delete_run``) and compute logs; a run that has not finished is never touched.
    Returns the ids deleted."""
    from datetime import datetime, timezone

    from dagster import DagsterRunStatus, RunsFilter

    cutoff = datetime.fromtimestamp(now - older_than_days * DAY_S, tz=timezone.utc)
    filters = RunsFilter(created_before=cutoff, statuses=[DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE,
                                                          DagsterRunStatus.CANCELED])
    deleted: list[str] = []
    seen: set[str] = set()
    while True:
        fresh = [record.dagster_run.run_id for record in instance.get_run_records(filters, limit=page)
                 if record.dagster_run.run_id not in seen]
        if not fresh:
            return deleted
        for run_id in fresh:
            seen.add(run_id)
            instance.delete_run(run_id)
            instance.compute_log_manager.delete_logs(prefix=[run_id])
            deleted.append(run_id)


# -- logs ---------------------------------------------------------------------------------------------------------


def log_files(file_store) -> list[Path]:
    """The logs `vbatch up` and the managed engines and Label Studio write on this node (not the rotated copies)."""
    found = []
    for directory in (file_store.logs_dir, file_store.engines_dir, file_store.label_studio_dir):
        if directory.is_dir():
            found += [path for path in directory.glob("*.log") if path.is_file() and not path.is_symlink()]
    return sorted(found)


def rotate_log(path: Path, keep: int) -> int:
    """Copy ``path`` to ``path.1`` (``.1`` to ``.2``, ... the oldest beyond ``keep`` dropped), then truncate it in
    place: its writers hold O_APPEND descriptors, so they go on writing at the new end, the start. Returns the
    bytes moved to ``.1``. Lines written between the last copy and the truncation are lost (as with logrotate's
    copytruncate): the copy catches up once before truncating to keep that window small."""
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{n + 1}"))
    copied = 0
    with open(path, "rb") as source, open(path.with_name(f"{path.name}.1"), "wb") as copy:
        for _ in range(2):  # what is there, then what was appended meanwhile
            while chunk := source.read(1024 * 1024):
                copy.write(chunk)
                copied += len(chunk)
        os.truncate(path, 0)
    return copied


def rotate_logs(paths: Iterable[Path], max_bytes: int, keep: int) -> dict[str, int]:
    """Rotate each log larger than ``max_bytes``; returns {path: bytes rotated} of those rotated."""
    rotated = {}
    for path in paths:
        try:
            if path.stat().st_size > max_bytes:
                rotated[str(path)] = rotate_log(path, keep)
        except FileNotFoundError:  # removed meanwhile
            continue
    return rotated


# -- disk ---------------------------------------------------------------------------------------------------------


def tree_bytes(path: Path) -> int:
    """The apparent size of the files under ``path`` (symlinks not followed; nothing there: 0)."""
    try:
        if not path.is_dir():
            return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0
    total, pending = 0, [str(path)]
    while pending:
        try:
            entries = os.scandir(pending.pop())
        except OSError:  # removed or unreadable meanwhile
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    else:
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    return total


def disk_kinds(file_store) -> dict[str, list[Path]]:
    """What ``vbatch_disk_bytes{kind}`` measures: the store's parts and this node's own."""
    database = file_store.database_path
    dagster = [file_store.dagster_dir]
    if file_store.shared_dagster_dir != file_store.dagster_dir:
        dagster.append(file_store.shared_dagster_dir)
    return {"files": [file_store.files_dir], "batches": [file_store.batches_dir],
            "datasets": [file_store.datasets_dir], "fine_tunes": [file_store.fine_tunes_dir],
            "models": [file_store.models_dir], "dagster": dagster, "logs": [file_store.logs_dir],
            "engines": [file_store.engines_dir], "label_studio": [file_store.label_studio_dir],
            "database": [database, database.with_name(database.name + "-wal"),
                         database.with_name(database.name + "-shm")]}


@dataclass(frozen=True)
class DiskUsage:
    kinds: dict[str, int]  # bytes by kind
    free: int  # bytes free (to an unprivileged writer) on the store's filesystem
    total: int

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free / self.total if self.total else 0.0


def free_space(path: Path) -> tuple[int, int]:
    """(free, total) bytes of the filesystem holding ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return usage.free, usage.total


_measured: dict[tuple[str, ...], tuple[float, dict[str, int]]] = {}
_measuring = threading.Lock()
DISK_USAGE_MAX_AGE_S = 60.0


def disk_usage(file_store, max_age_s: float = DISK_USAGE_MAX_AGE_S) -> DiskUsage:
    """Bytes by kind (measured at most every ``max_age_s``: it walks the store) and the free space now (a
    statvfs, cheap)."""
    kinds = disk_kinds(file_store)
    key = tuple(str(path) for paths in kinds.values() for path in paths)
    with _measuring:  # one walk at a time; a scrape that waited finds the fresh figures
        at, sizes = _measured.get(key, (0.0, {}))
        if time.monotonic() - at >= max_age_s or not sizes:
            sizes = {kind: sum(tree_bytes(path) for path in paths) for kind, paths in kinds.items()}
            _measured[key] = (time.monotonic(), sizes)
    free, total = free_space(file_store.shared)
    return DiskUsage(kinds=dict(sizes), free=free, total=total)


class DiskFull(VbatchError):
    """Less than the free-space floor is left on the store's disk: new work is refused, accepted work goes on."""

    status = 507
    code = "insufficient_storage"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def require_free_disk(file_store, min_free_percent: float, what: str) -> None:
    """Refuse new ``what`` (DiskFull, 507) when less than ``min_free_percent`` of the store's filesystem is free
    (0: never). Only the free space is read (a statvfs), so every create can afford it."""
    if min_free_percent <= 0:
        return
    free, total = free_space(file_store.shared)
    percent = 100.0 * free / total if total else 0.0
    if percent >= min_free_percent:
        return
    raise DiskFull(
        f"The disk of vbatch's file store has {human_bytes(free)} free ({percent:.1f} % of {human_bytes(total)}), "
        f"less than the {min_free_percent:g} % it keeps free (VBATCH_MIN_FREE_DISK_PERCENT), so it takes no new "
        f"{what} until space is freed; batches already accepted carry on. Delete files you no longer need "
        "(DELETE /v1/files/{file_id}), shorten the retention (VBATCH_FILE_RETENTION_DAYS) and run retention_job, "
        "or give the store more disk, then try again.")
