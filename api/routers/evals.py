"""/v1/evals: fixed evaluation sets (frozen by an admin) and the models scored on them, with a leaderboard per
set. Scoring a model records an eval run and launches its (set, model) partition of ``eval_score``."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from api.deps import get_caller, get_db, get_file_store, get_model_registry, get_settings, record, require_admin
from api.pagination import paginate
from api.schemas import EvalObject, EvalRunObject, Leaderboard, Page, StrictBody
from resources import FileStore, ModelRegistry
from vbatch_pipelines import evals
from vbatch_pipelines.projects import Caller
from vbatch_pipelines.settings import Settings
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import EvalRun, EvalSet
from vbatch_pipelines.submit import start_eval_run

router = APIRouter(tags=["evals"])


class EvalSource(StrictBody):
    type: Literal["dataset", "file"]
    version: str | None = Field(default=None, max_length=32, description="a dataset version: its eval split")
    file_id: str | None = Field(default=None, max_length=64, description="a file in OpenAI's chat format")


class CreateEvalRequest(StrictBody):
    name: str = Field(min_length=1, max_length=256)
    source: EvalSource


class CreateEvalRunRequest(StrictBody):
    model: str = Field(min_length=1, max_length=512)


@router.post("/evals", response_model=EvalObject, dependencies=[Depends(require_admin)])
def create_eval(body: CreateEvalRequest, request: Request, db: Database = Depends(get_db),
                file_store: FileStore = Depends(get_file_store), caller: Caller = Depends(get_caller)) -> dict:
    """Freeze a set (admin): a dataset version's eval split or an uploaded chat file, copied and fingerprinted."""
    created = evals.create_eval_set(db, file_store.evals_dir, name=body.name,
                                    source=body.source.model_dump(exclude_none=True), owner=caller.owner)
    record(request, "eval.created", created.id, items=created.items)
    return created.to_openai()


@router.get("/evals", response_model=Page[EvalObject])
def list_evals(after: str | None = None, limit: int = Query(default=20, ge=1, le=100),
               db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    with db.session() as session:
        return paginate(session, EvalSet, after=after, limit=limit, where=[EvalSet.project_id == caller.project_id])


@router.get("/evals/{eval_id}", response_model=EvalObject)
def retrieve_eval(eval_id: str, db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    return evals.get_eval_set(db, eval_id, caller.project_id).to_openai()


@router.post("/evals/{eval_id}/runs", response_model=EvalRunObject)
async def create_eval_run(eval_id: str, body: CreateEvalRunRequest, request: Request, db: Database = Depends(get_db),
                          model_registry: ModelRegistry = Depends(get_model_registry),
                          settings: Settings = Depends(get_settings), caller: Caller = Depends(get_caller)) -> dict:
    """Score a model (base or fine-tune) on the set: recorded, then its run launched (the sensor launches it when
    Dagster is unreachable now)."""
    run = await asyncio.to_thread(start_eval_run, db, model_registry, settings.dagster.url, eval_id, body.model,
                                  owner=caller.owner)
    await asyncio.to_thread(record, request, "eval.run_created", run.id, model=run.model)
    return run.to_openai()


@router.get("/evals/{eval_id}/runs", response_model=Page[EvalRunObject])
def list_eval_runs(eval_id: str, after: str | None = None, limit: int = Query(default=20, ge=1, le=100),
                   db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    evals.get_eval_set(db, eval_id, caller.project_id)
    with db.session() as session:
        return paginate(session, EvalRun, after=after, limit=limit,
                        where=[EvalRun.eval_id == eval_id, EvalRun.project_id == caller.project_id])


@router.get("/evals/{eval_id}/runs/{run_id}", response_model=EvalRunObject)
def retrieve_eval_run(eval_id: str, run_id: str, db: Database = Depends(get_db),
                      caller: Caller = Depends(get_caller)) -> dict:
    evals.get_eval_set(db, eval_id, caller.project_id)
    run = db.get(EvalRun, run_id)
    if run is None or run.eval_id != eval_id:
        raise evals.EvalNotFound(f"No run {run_id!r} of eval {eval_id}", "run_id")
    return run.to_openai()


@router.get("/evals/{eval_id}/leaderboard", response_model=Leaderboard)
def eval_leaderboard(eval_id: str, db: Database = Depends(get_db), caller: Caller = Depends(get_caller)) -> dict:
    """vbatch's own: each model's latest completed score on the set, best first."""
    found = evals.get_eval_set(db, eval_id, caller.project_id)
    return {"eval_id": found.id, "name": found.name, "items": found.items, "ranked_by": list(evals.RANKED_BY),
            "data": evals.leaderboard(db, eval_id)}
