"""Models: served models and installs, install and delete (admins), a model's install status, the try-it box."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel
from pydantic import Field as PydanticField

from api.console import (
    console_audit,
    console_login,
    console_role,
    missing_page,
    render,
)
from api.deps import Role
from vbatch_pipelines.projects import Caller

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, error: str | None = None, role: Role = Depends(console_role),
           caller: Caller = Depends(console_login)) -> HTMLResponse:
    """Base models, and the fine-tunes the caller's project may use (its own and shared ones); only its own
    fine-tunes can be undeployed from here."""
    from vbatch_pipelines.models.registry import EMBED, GENERATE
    from vbatch_pipelines.store.models import Model

    registry = request.app.state.resources.model_registry
    served = registry.served_models(caller.project_id)
    with request.app.state.db.session() as session:
        stored = {row.id: row for row in session.query(Model) if row.visible_to(caller.project_id)}
    rows = []
    for model_id, spec in sorted(served.items()):
        row = stored.get(model_id)
        kind = "fine-tune" if spec.parent else "base" if spec.task == GENERATE else \
            "base, embeddings" if spec.task == EMBED else "base, cross-encoder"
        rows.append({"id": model_id, "kind": kind, "parent": spec.parent, "chat": spec.task == GENERATE,
                     "status": row.status if row is not None else "configured", "source": row.source if row else None,
                     "removable": _removable(row, caller), "default": model_id == registry.default_model_id(),
                     "served": True})
    rows += [{"id": row.id, "kind": row.kind.replace("_", "-"), "parent": row.parent, "status": row.status,
              "source": row.source, "removable": _removable(row, caller), "default": False, "served": False}
             for row in stored.values() if row.id not in served]
    return render(request, "models.html", role, models=rows, error=error)


def _removable(row, caller: Caller) -> bool:
    """Whether the models page offers to remove it: a stored base model (admins), or the project's own fine-tune
    (a shared one of another project is used, not removed, here)."""
    return row is not None and (row.kind != "fine_tune" or row.project_id == caller.project_id)


@router.get("/models/{model_id:path}/status", response_class=HTMLResponse)
def model_status(request: Request, model_id: str, role: Role = Depends(console_role),
                 caller: Caller = Depends(console_login)) -> HTMLResponse:
    """A model's install: the fit check's numbers, its state, the latest line of its run (the page refreshes
    this part until the install ends). Another project's fine-tune (not shared) is as good as missing."""
    from vbatch_pipelines.models.store import get_model

    row = get_model(request.app.state.db, model_id[:512])
    if row is None or not row.visible_to(caller.project_id):
        return missing_page(request, role, f"model {model_id[:512]}", "/ui/models")
    details = dict(row.details or {})
    return render(request, "model_status.html", role, model=row, fit=details.get("fit") or {},
                 error=details.get("error"), latest=_latest_run_line(details.get("dagster_run_id")),
                 run_id=details.get("dagster_run_id"))


def _latest_run_line(run_id: str | None) -> str | None:
    if not run_id:
        return None
    from vbatch_pipelines.launch import dagster_instance

    try:
        logs = dagster_instance().all_logs(run_id)
    except Exception:  # noqa: BLE001 - the page shows the state without it
        return None
    messages = [entry.message for entry in logs if entry.user_message]
    return messages[-1][:300] if messages else None


@router.post("/models")
def install_model(request: Request, source: str = Form(max_length=512), model_id: str = Form("", max_length=256),
                  role: Role = Depends(console_role)) -> Response:
    """For admins, as ``POST /v1/models``: refused at once when the policy or the fit check says no."""
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.submit import start_install

    if role != "admin":
        return RedirectResponse("/ui/models?error=" + quote("Installing a model needs an admin key."), status_code=303)
    state = request.app.state
    try:
        row = start_install(state.db, state.resources.model_registry, state.engines.resource,
                            state.settings.dagster.url, source.strip(), model_id=model_id.strip() or None)
    except VbatchError as exc:
        return RedirectResponse(f"/ui/models?error={quote(str(exc)[:300])}", status_code=303)
    console_audit(request, "model.installed", row.id, source=row.source, revision=row.revision)
    return RedirectResponse(f"/ui/models/{quote(row.id)}/status", status_code=303)


@router.post("/models/{model_id:path}/delete")
def delete_model(request: Request, model_id: str, role: Role = Depends(console_role),
                 caller: Caller = Depends(console_login)) -> Response:
    """Undeploy a fine-tune (its project's keys) or delete an installed base model (admins), as
    ``DELETE /v1/models``: another project's fine-tune is refused as a missing model."""
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.models.store import get_model, remove_model

    state = request.app.state
    row = get_model(state.db, model_id[:512])
    if row is not None and row.kind == "base" and role != "admin":
        return RedirectResponse("/ui/models?error=" + quote("Deleting a base model needs an admin key."),
                                status_code=303)
    try:
        remove_model(state.db, state.resources.model_registry, state.engines.resource, model_id[:512],
                     caller.project_id)
    except VbatchError as exc:
        return RedirectResponse(f"/ui/models?error={quote(str(exc)[:300])}", status_code=303)
    state.engines.forget(model_id[:512])
    console_audit(request, "model.deleted", model_id[:512], kind=row.kind if row is not None else "alias")
    return RedirectResponse("/ui/models", status_code=303)


# -- projects and keys (platform admins) ------------------------------------------------------------------------


class TryIt(BaseModel):
    model: str = PydanticField(max_length=512)
    content: str = PydanticField(min_length=1, max_length=8000)
    max_tokens: int = PydanticField(default=256, ge=1, le=2048)
    temperature: float = PydanticField(default=0.7, ge=0.0, le=2.0)


@router.post("/chat")
async def try_it(request: Request, body: TryIt, role: Role = Depends(console_role),
                 caller: Caller = Depends(console_login)):
    """The models page's try-it box: one user message to a model the caller's project may use, its answer
    streamed back as the chat route's server-sent events."""
    from api.routers.completions import get_budget, serve_completion
    from vbatch_pipelines.protocol import ChatCompletionRequest

    chat = ChatCompletionRequest(model=body.model, messages=[{"role": "user", "content": body.content}],
                                 max_tokens=body.max_tokens, temperature=body.temperature, stream=True)
    # counted as the caller's project's online usage, and held to its quota, as the chat route does
    return await serve_completion("/v1/chat/completions", chat, request.app.state.engines, caller,
                                  await get_budget(request))
