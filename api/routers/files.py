"""/v1/files: upload (streamed to disk), list, retrieve, download, delete."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy import select

from api.deps import get_db, get_file_store, get_settings
from api.errors import OpenAIError, get_or_404, not_found
from api.pagination import paginate
from api.schemas import FILE_DOWNLOAD, Deleted, FileObject, Page
from resources import FileStore
from vbatch_pipelines.files import store_file
from vbatch_pipelines.settings import Settings
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import TERMINAL_BATCH_STATUSES, Batch
from vbatch_pipelines.store.models import File as FileRecord

router = APIRouter(tags=["files"])

UPLOAD_PURPOSES = ("batch", "fine-tune", "assistants", "vision", "user_data", "evals")


@router.post("/files", response_model=FileObject)
def create_file(
    file: UploadFile = File(...),
    purpose: str = Form(...),
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings),
    file_store: FileStore = Depends(get_file_store),
) -> dict:
    """Upload a file; multipart parts are spooled to disk, then moved into the file store."""
    if purpose not in UPLOAD_PURPOSES:
        raise OpenAIError(400, f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}; got '{purpose}'",
                          param="purpose", code="invalid_value")
    record = store_file(db, file_store.files_dir, file.file, file.filename or "upload", purpose,
                        max_bytes=settings.max_upload_bytes)
    return record.to_openai()


@router.get("/files", response_model=Page[FileObject])
async def list_files(
    purpose: str | None = None,
    after: str | None = None,
    limit: int = Query(default=10000, ge=1, le=10000),
    order: str = "desc",
    db: Database = Depends(get_db),
) -> dict:
    where = (FileRecord.purpose == purpose,) if purpose else ()
    with db.session() as session:
        return paginate(session, FileRecord, after=after, limit=limit, order=order, where=where)


def _file_or_404(db: Database, file_id: str) -> FileRecord:
    return get_or_404(db, FileRecord, file_id, "file", "file_id")


@router.get("/files/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: str, db: Database = Depends(get_db)) -> dict:
    return _file_or_404(db, file_id).to_openai()


@router.get("/files/{file_id}/content", response_class=FileResponse, responses=FILE_DOWNLOAD)
def file_content(file_id: str, db: Database = Depends(get_db)) -> FileResponse:
    record = _file_or_404(db, file_id)
    if not Path(record.path).exists():
        raise OpenAIError(404, f"The content of file '{file_id}' is gone from the file store.",
                          code="file_content_missing")
    return FileResponse(record.path, media_type="application/octet-stream", filename=record.filename)


@router.delete("/files/{file_id}", response_model=Deleted)
def delete_file(file_id: str, db: Database = Depends(get_db)) -> dict:
    """Delete a file - unless a batch that is still running reads it (that would lose accepted work)."""
    with db.session() as session:
        record = session.get(FileRecord, file_id)
        if record is None:
            raise not_found("file", file_id, param="file_id")
        busy = session.scalars(select(Batch.id).where(
            Batch.input_file_id == file_id, Batch.status.not_in(TERMINAL_BATCH_STATUSES)).limit(1)).first()
        if busy:
            raise OpenAIError(409, f"File '{file_id}' is the input of batch '{busy}', which has not finished; "
                              "cancel the batch or wait for it to end.", param="file_id", code="file_in_use")
        session.delete(record)
        path = Path(record.path)
    # Output files live in their batch's directory; they are removed from the store the same way.
    path.unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}
