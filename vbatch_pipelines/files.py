"""Files as records: bytes in the file store's ``files/`` directory (or a batch's or job's own directory,
for results), a row in the metadata DB. Batches, fine-tuning and the API all register files here."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import BinaryIO

from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import File


class FileTooLarge(VbatchError):
    status = 413
    code = "file_too_large"

    def __init__(self, max_bytes: int):
        super().__init__(f"File is larger than the limit of {max_bytes} bytes", "file")


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def get_file(db: Database, file_id: str) -> File | None:
    return db.get(File, file_id)


def store_file(db: Database, files_dir: Path, source: BinaryIO, filename: str, purpose: str,
               *, max_bytes: int | None = None) -> File:
    """Stream ``source`` into the file store and record it; the file exists only once fully written."""
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
    return register_file(db, path, filename, purpose, file_id=file_id)


def file_record(path: Path, filename: str, purpose: str, *, file_id: str | None = None) -> File:
    """The record of a file written at ``path``, for the caller to add in its own transaction."""
    return File(id=file_id or new_file_id(), bytes=path.stat().st_size, created_at=int(time.time()),
                filename=filename, purpose=purpose, status="processed", path=str(path))


def register_file(db: Database, path: Path, filename: str, purpose: str, *, file_id: str | None = None) -> File:
    record = file_record(path, filename, purpose, file_id=file_id)
    with db.session() as session:
        session.add(record)
    return record
