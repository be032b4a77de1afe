"""Fine-tunes: the list, a new one, a job's page (loss, comparison, checkpoints), deploy."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api.console import (
    comparison_verdict,
    console_audit,
    console_login,
    console_role,
    list_page,
    missing_page,
    render,
)
from api.deps import Role
from vbatch_pipelines.projects import Caller

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("/fine-tunes", response_class=HTMLResponse)
def fine_tunes(request: Request, after: str | None = Query(default=None, max_length=64),
               role: Role = Depends(console_role), caller: Caller = Depends(console_login)) -> HTMLResponse:
    from vbatch_pipelines.store.models import FineTuningJob

    with request.app.state.db.session() as session:
        page = list_page(session, FineTuningJob, after, (FineTuningJob.project_id == caller.project_id,))
        jobs = {row.id: row for row in session.query(FineTuningJob).filter(
            FineTuningJob.id.in_([job["id"] for job in page["data"]]))}
    for job in page["data"]:
        job["verdict"] = comparison_verdict(jobs[job["id"]].comparison)
        job["deployed"] = jobs[job["id"]].deployed
    return render(request, "fine_tunes.html", role, page=page)


@router.get("/fine-tunes/new", response_class=HTMLResponse)
def new_fine_tune(request: Request, error: str | None = None, role: Role = Depends(console_role),
                  caller: Caller = Depends(console_login)) -> HTMLResponse:
    """The form: the base models that generate text, and the caller's project's dataset versions."""
    from vbatch_pipelines.curation.service import ready_datasets
    from vbatch_pipelines.models.registry import GENERATE

    registry = request.app.state.resources.model_registry
    with request.app.state.db.session() as session:
        versions = [{"version": row.version, "kind": row.kind}
                    for row in session.scalars(ready_datasets(caller.project_id, None).limit(50))]
    return render(request, "new_fine_tune.html", role, error=error, versions=versions,
                 models=sorted(m for m, spec in registry.base_models().items() if spec.task == GENERATE),
                 default_model=registry.default_model_id())


@router.post("/fine-tunes")
def create_fine_tune(request: Request, model: str = Form(max_length=256), training: str = Form(max_length=64),
                     n_epochs: str = Form("auto", max_length=8), lora_rank: str = Form("16", max_length=8),
                     learning_rate_multiplier: str = Form("auto", max_length=16),
                     suffix: str = Form("", max_length=64), deploy: str = Form("no_worse", max_length=16),
                     method: str = Form("supervised", max_length=16),
                     role: Role = Depends(console_role), caller: Caller = Depends(console_login)) -> Response:
    """Start a fine-tune (the caller's project's, on its dataset versions) as ``POST /v1/fine_tuning/jobs`` does:
    checked first, the reason shown on the form."""
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.submit import start_fine_tune

    state = request.app.state
    resources = state.resources
    hyperparameters = {"n_epochs": n_epochs if n_epochs == "auto" else _number(n_epochs, int),
                       "learning_rate_multiplier": learning_rate_multiplier if learning_rate_multiplier == "auto"
                       else _number(learning_rate_multiplier, float), "lora_rank": _number(lora_rank, int)}
    try:
        job = start_fine_tune(state.db, resources.model_registry, resources.file_store, resources.trainer,
                              state.settings.dagster.url, model=model, training_file=training.strip(),
                              hyperparameters=hyperparameters, suffix=suffix.strip() or None, deploy=deploy,
                              owner=caller.owner, method=method)
    except (VbatchError, ValueError) as exc:
        return RedirectResponse(f"/ui/fine-tunes/new?error={quote(str(exc)[:300])}", status_code=303)
    return RedirectResponse(f"/ui/fine-tunes/{quote(job.id)}", status_code=303)


def _number(text: str, kind):
    """A form's number, or the text itself (the job's own validation then names the field and its rule)."""
    try:
        return kind(text)
    except ValueError:
        return text


@router.get("/fine-tunes/{job_id}", response_class=HTMLResponse)
def fine_tune(request: Request, job_id: str, error: str | None = None,
              role: Role = Depends(console_role), caller: Caller = Depends(console_login)) -> HTMLResponse:
    from api.console.charts import line_chart
    from vbatch_pipelines.fine_tuning.service import get_job, list_checkpoints, loss_curve, recent_messages

    db = request.app.state.db
    job = get_job(db, job_id[:64], caller.project_id)
    if job is None:
        return missing_page(request, role, f"fine-tune {job_id[:64]}", "/ui/fine-tunes")
    checkpoints, more_checkpoints = list_checkpoints(db, job.id, after=None, limit=5)
    return render(request, "fine_tune.html", role, job=job.to_openai(), comparison=job.comparison,
                 verdict=comparison_verdict(job.comparison), deployed=job.deployed, job_deployment=job.deployment,
                 error=error, events=[e.to_openai() for e in recent_messages(db, job.id)],
                 loss_chart=line_chart(loss_curve(db, job.id), label="training loss by step", x_name="step",
                                       y_name="loss"),
                 checkpoints=[c.to_openai() for c in checkpoints], more_checkpoints=more_checkpoints)


@router.post("/fine-tunes/{job_id}/deploy")
def deploy(request: Request, job_id: str, role: Role = Depends(console_role),
           caller: Caller = Depends(console_login)) -> Response:
    """Serve a succeeded job's fine-tune now, as ``POST /v1/fine_tuning/jobs/{id}/deploy`` does (the caller's
    project's job only: another's is as good as missing)."""
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.fine_tuning.service import deploy_on_request, get_job

    state = request.app.state
    job = get_job(state.db, job_id[:64], caller.project_id)
    if job is None:
        return RedirectResponse("/ui/fine-tunes", status_code=303)
    target = f"/ui/fine-tunes/{quote(job.id)}"
    try:
        deploy_on_request(state.db, state.resources.model_registry, state.engines.resource, job)
    except VbatchError as exc:
        return RedirectResponse(f"{target}?error={quote(str(exc)[:300])}", status_code=303)
    except Exception as exc:  # noqa: BLE001 - the engine's refusal, shown on the page
        return RedirectResponse(f"{target}?error={quote(f'The engine did not load it: {exc}'[:300])}", status_code=303)
    console_audit(request, "fine_tune.deployed", job.id, model=job.fine_tuned_model)
    return RedirectResponse(target, status_code=303)
