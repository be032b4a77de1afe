"""Batches: the list, a new batch from a file, a batch's page and live progress, cancel, downloads."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from api.console import (
    console_login,
    console_role,
    list_page,
    missing_page,
    render,
)
from api.deps import Role
from vbatch_pipelines.projects import Caller
from vbatch_pipelines.protocol import SUPPORTED_ENDPOINTS
from vbatch_pipelines.store.models import of_project

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("/batches", response_class=HTMLResponse)
def batches(request: Request, status: str | None = Query(default=None, max_length=16),
            after: str | None = Query(default=None, max_length=64), role: Role = Depends(console_role),
            caller: Caller = Depends(console_login)) -> HTMLResponse:
    from vbatch_pipelines.store.models import BATCH_STATUSES, Batch

    if status and status not in BATCH_STATUSES:
        status = None
    where = (Batch.project_id == caller.project_id, *((Batch.status == status,) if status else ()))
    with request.app.state.db.session() as session:
        page = list_page(session, Batch, after, where)
    return render(request, "batches.html", role, page=page, status=status, statuses=BATCH_STATUSES)


@router.get("/batches/new", response_class=HTMLResponse)
def new_batch(request: Request, error: str | None = None, role: Role = Depends(console_role),
              caller: Caller = Depends(console_login)) -> HTMLResponse:
    from vbatch_pipelines.curation.schemas import SCHEMAS

    registry = request.app.state.resources.model_registry
    return render(request, "new_batch.html", role, models=sorted(registry.served_models(caller.project_id)),
                 default_model=registry.default_model_id(), error=error, endpoints=SUPPORTED_ENDPOINTS,
                 schemas=sorted(SCHEMAS))


@router.post("/batches")
def create_batch_from_form(request: Request, file: UploadFile = File(...), endpoint: str = Form(max_length=64),
                           model: str = Form("", max_length=256), curation: str = Form("on", max_length=8),
                           schema: str = Form("", max_length=64), role: Role = Depends(console_role),
                           caller: Caller = Depends(console_login)) -> Response:
    """Upload a JSONL and create its batch (both the caller's project's), as the API's two calls do; lines that
    name no model get the one picked. A refusal comes back to the form with the API's message."""
    from vbatch_pipelines.batch.service import BatchRequestError
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.files import store_file
    from vbatch_pipelines.retention import require_free_disk
    from vbatch_pipelines.submit import accept_batch

    state, settings = request.app.state, request.app.state.settings
    resources = state.resources
    source = file.file if not model else _with_model(file.file, model)
    try:
        require_free_disk(resources.file_store, resources.retention_policy.min_free_disk_percent, "batches")
        stored = store_file(state.db, resources.file_store.files_dir, source, file.filename or "upload.jsonl",
                            "batch", max_bytes=settings.api.max_upload_bytes, owner=caller.owner)
        metadata = {"curation": "off"} if curation == "off" else {"curation_schema": schema} if schema else None
        batch = accept_batch(state.db, resources.file_store, resources.model_registry, state.batch_launcher,
                             input_file_id=stored.id, endpoint=endpoint, metadata=metadata,
                             inline_validation_bytes=settings.api.inline_validation_bytes, owner=caller.owner)
    except (BatchRequestError, VbatchError) as exc:
        return RedirectResponse(f"/ui/batches/new?error={quote(str(exc)[:300])}", status_code=303)
    return RedirectResponse(f"/ui/batches/{quote(batch.id)}", status_code=303)


def _with_model(upload, model: str):
    """The upload with ``model`` set in each line's body that names none; a line that is not a JSON object is
    left as it is (validation reports it with its line number)."""
    import tempfile

    out = tempfile.SpooledTemporaryFile(max_size=8 * 2**20)
    for raw in upload:
        try:
            line = json.loads(raw)
            if isinstance(line, dict) and isinstance(line.get("body"), dict) and not line["body"].get("model"):
                line["body"]["model"] = model
                raw = (json.dumps(line, ensure_ascii=False) + "\n").encode()
        except ValueError:
            pass
        out.write(raw)
    out.seek(0)
    return out


@router.get("/batches/{batch_id}", response_class=HTMLResponse)
def batch(request: Request, batch_id: str, role: Role = Depends(console_role),
          caller: Caller = Depends(console_login)) -> HTMLResponse:
    from vbatch_pipelines.batch.service import get_batch

    record = of_project(get_batch(request.app.state.db, batch_id[:64]), caller.project_id)
    if record is None:
        return missing_page(request, role, f"batch {batch_id[:64]}", "/ui/batches")
    return render(request, "batch.html", role, batch=record.to_openai())


@router.get("/batches/{batch_id}/progress", response_class=HTMLResponse)
def batch_progress(request: Request, batch_id: str, role: Role = Depends(console_role),
                   caller: Caller = Depends(console_login)) -> HTMLResponse:
    """The live part of a batch's page (the page's script swaps it in every 2 s until the batch ends)."""
    from vbatch_pipelines.batch.service import get_batch

    record = of_project(get_batch(request.app.state.db, batch_id[:64]), caller.project_id)
    if record is None:
        return HTMLResponse("<p class=error>This batch is gone.</p>", status_code=404)
    return render(request, "batch_progress.html", role, batch=record.to_openai())


@router.post("/batches/{batch_id}/cancel")
def cancel(request: Request, batch_id: str, role: Role = Depends(console_role),
           caller: Caller = Depends(console_login)) -> Response:
    from vbatch_pipelines.batch.service import get_batch, request_cancel

    if of_project(get_batch(request.app.state.db, batch_id[:64]), caller.project_id) is not None:
        request_cancel(request.app.state.db, batch_id[:64])
    return RedirectResponse(f"/ui/batches/{quote(batch_id[:64])}", status_code=303)


@router.get("/files/{file_id}", response_class=FileResponse)
def download(request: Request, file_id: str, role: Role = Depends(console_role),
             caller: Caller = Depends(console_login)) -> Response:
    from vbatch_pipelines.files import get_file

    record = get_file(request.app.state.db, file_id[:64], caller.project_id)
    if record is None or not Path(record.path).exists():
        return missing_page(request, role, f"file {file_id[:64]}", "/ui/batches")
    return FileResponse(record.path, media_type="application/octet-stream", filename=record.filename)
