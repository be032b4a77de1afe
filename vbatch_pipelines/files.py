"""Files as records: bytes in the file store's ``files/`` directory (or a batch's or job's own directory,
for results), a row in the metadata DB. Batches, fine-tuning and the API all register files here, and the API
and the retention job delete them here (``delete_file``)."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select

from vbatch_pipelines.errors import NotFound, VbatchError
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import DEFAULT_OWNER, TERMINAL_BATCH_STATUSES, Batch, File, Owner, of_project

# OpenAI's bounds on expires_after.seconds (1 hour to 30 days)
MIN_EXPIRES_AFTER_S, MAX_EXPIRES_AFTER_S = 3600, 30 * 86400


class FileTooLarge(VbatchError):
    status = 413
    code = "file_too_large"

    def __init__(self, max_bytes: int):
        super().__init__(f"File is larger than the limit of {max_bytes} bytes", "file")


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def get_file(db: Database, file_id: str, project_id: str | None = None) -> File | None:
    """The file (of ``project_id`` only, when given: another project's is as good as missing)."""
    return of_project(db.get(File, file_id), project_id)


class FileInUse(VbatchError):
    """Deleting the file would take the input of a batch that has not finished."""

    status = 409
    code = "file_in_use"

    def __init__(self, file_id: str, batch_id: str):
        super().__init__(f"File '{file_id}' is the input of batch '{batch_id}', which has not finished; cancel the "
                         "batch or wait for it to end.", "file_id")


def expires_after_seconds(value: dict[str, Any], param: str) -> int:
    """OpenAI's ``expires_after`` / ``output_expires_after`` (``{"anchor": "created_at", "seconds": N}``, N from
    3600 to 2592000) as its seconds; anything else is a 400 naming the field at fault. Seconds arrive as an
    integer (JSON) or its decimal text (a multipart form field)."""
    if not isinstance(value, dict):
        raise VbatchError(f"{param} takes an object: {{\"anchor\": \"created_at\", \"seconds\": N}}", param)
    unknown = sorted(set(value) - {"anchor", "seconds"})
    if unknown:
        raise VbatchError(f"{param} takes anchor and seconds only; got {unknown[0]!r}", f"{param}.{unknown[0]}",
                          "unknown_parameter")
    anchor, seconds = value.get("anchor"), value.get("seconds")
    if anchor is None:
        raise VbatchError(f"{param}.anchor is required (\"created_at\")", f"{param}.anchor", "missing_required_parameter")
    if anchor != "created_at":
        raise VbatchError(f"{param}.anchor must be 'created_at'; got {str(anchor)[:64]!r}", f"{param}.anchor",
                          "invalid_value")
    if seconds is None:
        raise VbatchError(f"{param}.seconds is required", f"{param}.seconds", "missing_required_parameter")
    if isinstance(seconds, str) and re.fullmatch(r"[+-]?\d{1,20}", seconds.strip()):
        seconds = int(seconds.strip())
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise VbatchError(f"{param}.seconds must be an integer; got {str(seconds)[:64]!r}", f"{param}.seconds",
                          "invalid_type")
    if not MIN_EXPIRES_AFTER_S <= seconds <= MAX_EXPIRES_AFTER_S:
        raise VbatchError(f"{param}.seconds must be between {MIN_EXPIRES_AFTER_S} (1 hour) and "
                          f"{MAX_EXPIRES_AFTER_S} (30 days); got {seconds}", f"{param}.seconds", "invalid_value")
    return seconds


def store_file(db: Database, files_dir: Path, source: BinaryIO, filename: str, purpose: str,
               *, max_bytes: int | None = None, expires_after: int | None = None,
               owner: Owner = DEFAULT_OWNER) -> File:
    """Stream ``source`` into the file store and record it as ``owner``'s; the file exists only once fully
    written. ``expires_after``: seconds after creation it expires (None: its purpose's default retention)."""
    file_id = new_file_id()
    files_dir.mkdir(parents=True, exist_ok=True)
    path = files_dir / file_id
    tmp = path.with_suffix(".part")
    size = 0
    try:
        with open(tmp, "wb") as out:
            while chunk := source.read(1024 * 1024):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise FileTooLarge(max_bytes)
                out.write(chunk)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return register_file(db, path, filename, purpose, file_id=file_id, expires_after=expires_after, owner=owner)


def file_record(path: Path, filename: str, purpose: str, *, file_id: str | None = None,
                expires_after: int | None = None, owner: Owner = DEFAULT_OWNER) -> File:
    """The record of a file written at ``path``, for the caller to add in its own transaction; it expires
    ``expires_after`` seconds from now (None: its purpose's default retention)."""
    created = int(time.time())
    return File(id=file_id or new_file_id(), bytes=path.stat().st_size, created_at=created,
                filename=filename, purpose=purpose, status="processed", path=str(path),
                expires_at=None if expires_after is None else created + expires_after, **owner.columns())


def register_file(db: Database, path: Path, filename: str, purpose: str, *, file_id: str | None = None,
                  expires_after: int | None = None, owner: Owner = DEFAULT_OWNER) -> File:
    record = file_record(path, filename, purpose, file_id=file_id, expires_after=expires_after, owner=owner)
    with db.session() as session:
        session.add(record)
    return record


def delete_file(db: Database, file_id: str, project_id: str | None = None) -> File:
    """Delete a file's record and its bytes - unless a batch that has not finished reads it (FileInUse: that
    would lose accepted work). The API's DELETE and the retention job both delete through here. A batch keeps
    its record, and its ``output_file_id`` names the deleted file, as OpenAI's does."""
    with db.session() as session:
        record = session.get(File, file_id, with_for_update=True)
        if of_project(record, project_id) is None:
            raise NotFound(f"No file found with id '{file_id}'.", "file_id", "file_not_found")
        busy = session.scalars(select(Batch.id).where(
            Batch.input_file_id == file_id, Batch.status.not_in(TERMINAL_BATCH_STATUSES)).limit(1)).first()
        if busy:
            raise FileInUse(file_id, busy)
        session.delete(record)
    # After the commit: a failed commit leaves the bytes. Output files live in their batch's directory.
    Path(record.path).unlink(missing_ok=True)
    return record
