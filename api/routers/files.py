"""/v1/files: upload (streamed to disk), list, retrieve, download, delete. A file shows when it expires
(``expires_at``: its own ``expires_after``, or the default retention of batch files); the retention job deletes it
then."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from api.deps import get_caller, get_db, get_file_store, get_settings, record
from api.errors import OpenAIError, get_or_404
from api.pagination import paginate
from api.schemas import FILE_DOWNLOAD, Deleted, FileObject, Page
from resources import FileStore, RetentionPolicy
from vbatch_pipelines.files import delete_file as delete_file_and_bytes
from vbatch_pipelines.files import expires_after_seconds, store_file
from vbatch_pipelines.projects import Caller
from vbatch_pipelines.retention import require_free_disk
from vbatch_pipelines.settings import Settings
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import File as FileRecord

router = APIRouter(tags=["files"])

UPLOAD_PURPOSES = ("batch", "fine-tune", "assistants", "vision", "user_data", "evals")


async def get_retention_policy(request: Request) -> RetentionPolicy:
    return request.app.state.resources.retention_policy


def with_expiry(file: dict, policy: RetentionPolicy) -> dict:
    """The file object with the time it expires, its own or its purpose's default."""
    return {**file, "expires_at": policy.file_expires_at(file["created_at"], file["purpose"], file["expires_at"])}


@router.post("/files", response_model=FileObject)
def create_file(
    file: UploadFile = File(...),
    purpose: str = Form(...),
    expires_after_anchor: str | None = Form(default=None, alias="expires_after[anchor]", max_length=64),
    expires_after_seconds_: str | None = Form(default=None, alias="expires_after[seconds]", max_length=64),
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings),
    file_store: FileStore = Depends(get_file_store),
    policy: RetentionPolicy = Depends(get_retention_policy),
    caller: Caller = Depends(get_caller),
) -> dict:
    """Upload a file (the caller's project's); multipart parts are spooled to disk, then moved into the file store. ``expires_after``
    comes as the openai SDK sends it, the form fields ``expires_after[anchor]`` and ``expires_after[seconds]``."""
    if purpose not in UPLOAD_PURPOSES:
        raise OpenAIError(400, f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}; got '{purpose}'",
                          param="purpose", code="invalid_value")
    expires_after = None
    if expires_after_anchor is not None or expires_after_seconds_ is not None:
        given = {"anchor": expires_after_anchor, "seconds": expires_after_seconds_}
        expires_after = expires_after_seconds({k: v for k, v in given.items() if v is not None}, "expires_after")
    require_free_disk(file_store, policy.min_free_disk_percent, "uploads")
    record = store_file(db, file_store.files_dir, file.file, file.filename or "upload", purpose,
                        max_bytes=settings.api.max_upload_bytes, expires_after=expires_after, owner=caller.owner)
    return with_expiry(record.to_openai(), policy)


@router.get("/files", response_model=Page[FileObject])
def list_files(
    purpose: str | None = None,
    after: str | None = None,
    limit: int = Query(default=10000, ge=1, le=10000),
    order: str = "desc",
    db: Database = Depends(get_db),
    policy: RetentionPolicy = Depends(get_retention_policy),
    caller: Caller = Depends(get_caller),
) -> dict:
    where = (FileRecord.project_id == caller.project_id, *((FileRecord.purpose == purpose,) if purpose else ()))
    with db.session() as session:
        page = paginate(session, FileRecord, after=after, limit=limit, order=order, where=where)
    return {**page, "data": [with_expiry(file, policy) for file in page["data"]]}


def _file_or_404(db: Database, file_id: str, caller: Caller) -> FileRecord:
    return get_or_404(db, FileRecord, file_id, "file", "file_id", caller.project_id)


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, db: Database = Depends(get_db),
                  policy: RetentionPolicy = Depends(get_retention_policy),
                  caller: Caller = Depends(get_caller)) -> dict:
    return with_expiry(_file_or_404(db, file_id, caller).to_openai(), policy)


@router.get("/files/{file_id}/content", response_class=FileResponse, responses=FILE_DOWNLOAD)
def file_content(file_id: str, db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> FileResponse:
    record = _file_or_404(db, file_id, caller)
    if not Path(record.path).exists():
        raise OpenAIError(404, f"The content of file '{file_id}' is gone from the file store.",
                          code="file_content_missing")
    return FileResponse(record.path, media_type="application/octet-stream", filename=record.filename)


@router.delete("/files/{file_id}", response_model=Deleted)
def delete_file(file_id: str, request: Request, db: Database = Depends(get_db),
                caller: Caller = Depends(get_caller)) -> dict:
    """Delete a file and its bytes - unless a batch that is still running reads it (409: that would lose
    accepted work). The retention job deletes expired files the same way."""
    deleted = delete_file_and_bytes(db, file_id, caller.project_id)
    record(request, "file.deleted", file_id, filename=deleted.filename, bytes=deleted.bytes)
    return {"id": file_id, "object": "file", "deleted": True}
