"""Dataset versions: counts, checks, a preview, downloads."""

from __future__ import annotations

import json
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from api.console import (
    console_login,
    console_role,
    missing_page,
    render,
)
from api.deps import Role
from vbatch_pipelines.projects import Caller
from vbatch_pipelines.store.models import of_project

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("/datasets", response_class=HTMLResponse)
def datasets(request: Request, role: Role = Depends(console_role),
             caller: Caller = Depends(console_login)) -> HTMLResponse:
    from vbatch_pipelines.curation.service import ready_datasets

    with request.app.state.db.session() as session:
        rows = [row.to_api() for row in session.scalars(ready_datasets(caller.project_id, None).limit(50))]
    return render(request, "datasets.html", role, datasets=rows)


@router.get("/datasets/{version}", response_class=HTMLResponse)
def dataset(request: Request, version: str, role: Role = Depends(console_role),
            caller: Caller = Depends(console_login)) -> HTMLResponse:
    from vbatch_pipelines.curation.dataset import export_path
    from vbatch_pipelines.store.models import EXPORT_FORMATS, PREFERENCE

    record = _ready_dataset(request, version, caller)
    if record is None:
        return missing_page(request, role, f"dataset version {version[:32]}", "/ui/datasets")
    preview = []
    train = export_path(record, "openai", "train")
    if train.exists():
        with open(train, encoding="utf-8") as f:
            for raw, _ in zip(f, range(3)):
                line = json.loads(raw)
                if record.kind == PREFERENCE:  # the prompt, then the preferred and the non-preferred answer
                    line = {"messages": [*line["input"]["messages"],
                                         {"role": "preferred", "content": line["preferred_output"][0]["content"]},
                                         {"role": "not preferred",
                                          "content": line["non_preferred_output"][0]["content"]}]}
                preview.append(line.get("messages", []))
    asset = "preference_dataset" if record.kind == PREFERENCE else "gold_star_dataset"
    return render(request, "dataset.html", role, dataset=record.to_api(), formats=EXPORT_FORMATS[record.kind],
                 preview=preview, checks=_dataset_checks(record.dagster_run_id, asset))


def _ready_dataset(request: Request, version: str, caller: Caller):
    """The caller's project's complete dataset version ``version``, else None (missing, still being written, or
    another project's)."""
    from vbatch_pipelines.store.models import Dataset

    record = of_project(request.app.state.db.get(Dataset, version[:32]), caller.project_id)
    return record if record is not None and record.status == "ready" else None


def _dataset_checks(run_id: str | None, asset: str) -> list[dict] | None:
    """The checks of ``asset`` in the run that built the version, from Dagster (None when it cannot be asked)."""
    if not run_id:
        return None
    from dagster import DagsterEventType

    from vbatch_pipelines.launch import dagster_instance

    try:
        records = dagster_instance().get_records_for_run(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
    except Exception:  # noqa: BLE001 - the page shows the version without its checks
        return None
    checks = []
    for record in records.records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        if evaluation.asset_key.to_user_string() != asset:
            continue
        checks.append({"name": evaluation.check_name, "passed": evaluation.passed,
                       "severity": evaluation.severity.value if evaluation.severity else ""})
    return checks


@router.get("/datasets/{version}/export")
def dataset_export(request: Request, version: str, format: str = Query(max_length=16),
                   split: str = Query(max_length=8), role: Role = Depends(console_role),
                   caller: Caller = Depends(console_login)) -> Response:
    from vbatch_pipelines.curation.dataset import UnknownFormat, export_filename, export_path

    record = _ready_dataset(request, version, caller)
    if record is None:
        return missing_page(request, role, f"dataset version {version[:32]}", "/ui/datasets")
    try:
        path = export_path(record, format, split)
    except UnknownFormat as exc:
        return render(request, "missing.html", role, what=str(exc), back=f"/ui/datasets/{quote(record.version)}")
    return FileResponse(path, filename=export_filename(record, path),
                        media_type="application/octet-stream")
