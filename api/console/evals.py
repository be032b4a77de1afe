"""Fixed evaluation sets: their leaderboards, and scoring a model on one."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api.console import (
    console_login,
    console_role,
    missing_page,
    render,
)
from api.deps import Role
from vbatch_pipelines.projects import Caller

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("/evals", response_class=HTMLResponse)
def eval_sets(request: Request, role: Role = Depends(console_role),
              caller: Caller = Depends(console_login)) -> HTMLResponse:
    from sqlalchemy import select

    from vbatch_pipelines.store.models import EvalSet

    with request.app.state.db.session() as session:
        rows = [row.to_openai() for row in session.scalars(select(EvalSet).where(
            EvalSet.project_id == caller.project_id).order_by(EvalSet.created_at.desc()).limit(100))]
    return render(request, "evals.html", role, sets=rows)


@router.get("/evals/{eval_id}", response_class=HTMLResponse)
def eval_set(request: Request, eval_id: str, error: str | None = None, role: Role = Depends(console_role),
             caller: Caller = Depends(console_login)) -> HTMLResponse:
    """A set's leaderboard (each model's latest score, best first), a form to score another model, its runs."""
    from vbatch_pipelines import evals
    from vbatch_pipelines.models.registry import GENERATE

    db = request.app.state.db
    try:
        found = evals.get_eval_set(db, eval_id[:64], caller.project_id)
    except evals.EvalNotFound:
        return missing_page(request, role, f"evaluation set {eval_id[:64]}", "/ui/evals")
    registry = request.app.state.resources.model_registry
    models = sorted(name for name, spec in registry.served_models(project=caller.project_id).items()
                    if spec.task == GENERATE)
    return render(request, "eval.html", role, set=found.to_openai(), leaderboard=evals.leaderboard(db, found.id),
                 runs=[run.to_openai() for run in evals.runs_of(db, found.id)[:50]], models=models, error=error)


@router.post("/evals/{eval_id}/runs")
def score_on_eval_set(request: Request, eval_id: str, model: str = Form(max_length=512),
                      role: Role = Depends(console_role), caller: Caller = Depends(console_login)) -> Response:
    """Score a model on the set as ``POST /v1/evals/{id}/runs`` does; a refusal is shown on the page."""
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.submit import start_eval_run

    state = request.app.state
    back = f"/ui/evals/{quote(eval_id[:64])}"
    try:
        start_eval_run(state.db, state.resources.model_registry, state.settings.dagster.url, eval_id[:64], model,
                       owner=caller.owner)
    except VbatchError as exc:
        return RedirectResponse(f"{back}?error={quote(str(exc)[:300])}", status_code=303)
    return RedirectResponse(back, status_code=303)
