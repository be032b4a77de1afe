"""The web console (``/ui``) for people who do not write code: server-rendered pages over the same domain
functions the REST API uses, with the same roles. Login takes an API key, kept in an HttpOnly, SameSite=Strict
cookie; with no keys configured (a loopback-only platform) its one user is the operator, as for the API. Like the
API, it shows a key only its own project's batches, files, fine-tunes, datasets and fine-tuned models: another
project's id gets the page a missing one gets."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from pydantic import BaseModel
from pydantic import Field as PydanticField

from api.deps import Role, caller_of, caller_of_session, keys_required
from api.guard import AUTHENTICATED, CONSOLE_COOKIE
from vbatch_pipelines.projects import Caller
from vbatch_pipelines.protocol import SUPPORTED_ENDPOINTS
from vbatch_pipelines.store.models import of_project

HERE = Path(__file__).parent
COOKIE = CONSOLE_COOKIE
log = logging.getLogger("vbatch.console")
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(prefix="/ui", include_in_schema=False)


class LoginRequired(Exception):
    """The console's own 401: a redirect to the login page, not an API error."""

    def __init__(self, next_path: str):
        self.next_path = next_path


def keys_on(request: Request) -> bool:
    return keys_required(request.app.state)


def console_caller(request: Request) -> Caller:
    """Who uses the console (for the audit log): the caller ``console_login`` found for this request (every
    console route depends on it, through ``console_role``)."""
    return request.state.console_caller


def console_audit(request: Request, type: str, target: str, **details) -> None:
    from vbatch_pipelines.projects import audit

    audit(request.app.state.db, console_caller(request), type, target, **details)


def console_login(request: Request) -> Caller:
    """The logged-in caller (the operator when no key exists), or the login page. Every page's data is its
    project's (``caller.project_id``)."""
    from vbatch_pipelines.projects import OPERATOR

    if not keys_on(request):
        caller = OPERATOR
    else:
        caller = getattr(request.state, AUTHENTICATED, None) or caller_of_session(  # a form's: checked already
            request.app.state.settings, request.app.state.db, request.cookies.get(COOKIE, ""))
        if caller is None:
            raise LoginRequired(request.url.path)
    request.state.console_caller = caller
    return caller


def console_role(caller: Caller = Depends(console_login)) -> Role:
    return caller.role


def _page(request: Request, name: str, role: Role, **context) -> HTMLResponse:
    settings = request.app.state.settings
    return templates.TemplateResponse(request, name, {
        "role": role, "keys_on": keys_on(request), "project": _project_of(request),
        "extension_links": getattr(request.app.state, "console_links", []),
        "dagster_url": settings.dagster_url, "label_studio_url": _label_studio_url(request), **context})


def extension_page(request: Request, title: str, body: Markup, role: Role) -> HTMLResponse:
    """An extension's console page in the console's frame (header, nav, login); ``body`` is HTML the extension
    built with its values escaped (``markupsafe.escape``)."""
    return _page(request, "extension.html", role, title=title, body=body)


def _project_of(request: Request) -> dict | None:
    """The logged-in caller's project as the header shows it (its name, else its id)."""
    from vbatch_pipelines.store.models import Project

    caller = getattr(request.state, "console_caller", None)
    if caller is None:
        return None
    row = request.app.state.db.get(Project, caller.project_id)
    return {"id": caller.project_id, "name": row.name if row is not None else caller.project_id}


def _missing(request: Request, role: Role, what: str, back: str) -> HTMLResponse:
    """The page for an id that is not there - or is another project's: the same page, the same words."""
    return _page(request, "missing.html", role, what=what, back=back)


def _label_studio_url(request: Request) -> str | None:
    resource = request.app.state.resources["label_studio"]
    return resource.url if resource.enabled and resource.url else None


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/ui", error: str | None = None) -> HTMLResponse:
    return templates.TemplateResponse(request, "login.html", {"next": _safe_next(next), "error": error,
                                                              "role": None, "keys_on": True})


@router.post("/login")
def login(request: Request, key: str = Form(max_length=512), next: str = Form("/ui")) -> Response:
    """A key for a session: the cookie holds a session token kept server-side (never the key), HttpOnly,
    SameSite=Strict, Secure when the request came over HTTPS (directly, or through a proxy uvicorn trusts:
    VBATCH_FORWARDED_ALLOW_IPS). Each refused key is logged with the client's address; an address with too many
    recent refusals is answered 429 without its key being tried."""
    throttle, address = request.app.state.login_throttle, request.client.host if request.client else "?"
    wait = throttle.wait_s(address)
    if wait:
        log.warning("console login from %s refused unchecked: too many failed logins (retry in %.0fs)", address, wait)
        response = templates.TemplateResponse(request, "login.html", {
            "next": _safe_next(next), "role": None, "keys_on": True,
            "error": f"Too many failed logins from your address: try again in {max(1, round(wait))} seconds"},
            status_code=429)
        response.headers["Retry-After"] = str(max(1, round(wait)))
        return response
    if caller_of(request.app.state.settings, request.app.state.db, key.strip()) is None:
        failures = throttle.failed(address)
        log.warning("console login from %s refused: invalid key (%d failed in the last %.0fs)", address, failures,
                    throttle.window_s)
        return RedirectResponse(f"/ui/login?error=That+key+is+not+valid&next={quote(_safe_next(next))}",
                                status_code=303)
    throttle.succeeded(address)
    from vbatch_pipelines.projects import SESSION_TTL_S, start_session

    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(COOKIE, start_session(request.app.state.db, key.strip()), max_age=SESSION_TTL_S,
                        httponly=True, samesite="strict", path="/ui", secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    """Ends the session on the server too: its token, wherever a copy of the cookie went, opens nothing more."""
    from vbatch_pipelines.projects import end_session

    token = request.cookies.get(COOKIE)
    if token:
        end_session(request.app.state.db, token)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


def _safe_next(path: str) -> str:
    """Only a console path: a login link must not send anyone elsewhere."""
    return path if path.startswith("/ui") and "//" not in path and "\\" not in path else "/ui"


@router.get("", response_class=HTMLResponse)
def dashboard(request: Request, role: Role = Depends(console_role),
              caller: Caller = Depends(console_login)) -> HTMLResponse:
    """The caller's project's batches, costs, reviews and fine-tunes; the engines, services and disk are the
    platform's (shared by every project)."""
    from api.console.charts import bar_chart
    from vbatch_pipelines.metrics import busy_seconds, engines_with_stats, gold_stars_by_day, summarize
    from vbatch_pipelines.store.models import FineTuningJob

    db, project_id = request.app.state.db, caller.project_id
    midnight = int(time.mktime(time.localtime()[:3] + (0, 0, 0, 0, 0, -1)))
    with db.session() as session:
        fine_tunes = session.query(FineTuningJob).filter(FineTuningJob.project_id == project_id).order_by(
            FineTuningJob.created_at.desc()).limit(5).all()
        fine_tunes = [{"id": job.id, "model": job.model, "status": job.status,
                       "verdict": comparison_verdict(job.comparison), "deployed": job.deployed}
                      for job in fine_tunes]
    engines = [{"model": engine.model, "node": engine.node, "url": engine.url, "state": "up" if engine.up else f"down{': ' + engine.error if engine.error else ''}",
                "running": _count(engine.stats.get("running")), "waiting": _count(engine.stats.get("waiting")),
                "kv_cache": f"{100 * engine.stats['kv_cache_usage']:.0f} %" if "kv_cache_usage" in engine.stats else "–"}
               for engine in engines_with_stats(request.app.state.resources["inference_engine"])]
    today = summarize(db, ended_since=midnight, project_id=project_id)
    costs = {}
    hour_cost = request.app.state.settings.gpu_hour_cost
    if hour_cost is not None:
        for model, seconds in busy_seconds(db, ended_since=midnight, project_id=project_id).items():
            cost = seconds / 3600 * hour_cost
            tokens = sum(today.tokens.get(model, (0, 0)))
            costs[model] = {"busy": f"{seconds / 60:.1f} min", "cost": f"{cost:.4f}",
                            "per_1k": f"{1000 * cost / tokens:.6f}" if tokens else "–"}
    return _page(request, "dashboard.html", role, summary=summarize(db, project_id=project_id), today=today,
                 costs=costs,
                 hour_cost=hour_cost, services={name: probe() for name, probe in request.app.state.probes.items()},
                 engines=engines, fine_tunes=fine_tunes,
                 gold_chart=bar_chart(gold_stars_by_day(db, days=14, project_id=project_id)),
                 disk=_disk(request))


USAGE_DAYS = 14


@router.get("/usage", response_class=HTMLResponse)
def usage(request: Request, role: Role = Depends(console_role),
          caller: Caller = Depends(console_login)) -> HTMLResponse:
    """The caller's project's usage on each of the last 14 days (UTC days, the usage API's buckets): requests,
    tokens and engine seconds, batch and online, per model, as ``GET /v1/organization/usage/*`` counts them.
    Platform admins also see every project's totals over the same days; nobody else sees another project's."""
    from api.console.charts import bar_chart
    from vbatch_pipelines.store.models import Project
    from vbatch_pipelines.usage import COMPLETIONS, EMBEDDINGS, usage_page

    db = request.app.state.db
    start = (int(time.time()) // 86400 - (USAGE_DAYS - 1)) * 86400

    def buckets(kind: str, group_by: list[str], project_ids: list[str] | None) -> list[dict]:
        return usage_page(db, kind, start_time=start, bucket_width="1d", limit=USAGE_DAYS, group_by=group_by,
                          project_ids=project_ids)["data"]

    mine = [caller.project_id]
    days = {at: _no_usage() for at in range(start, start + USAGE_DAYS * 86400, 86400)}
    models: dict[tuple[str, str, str], dict] = {}
    modes = {"batch": _no_usage(), "online": _no_usage()}
    for kind, group_by in ((COMPLETIONS, ["model", "batch"]), (EMBEDDINGS, ["model"])):
        for bucket in buckets(kind, group_by, mine):
            for result in bucket["results"]:
                # embeddings are not told apart by batch in the usage API (OpenAI's shape): both, together
                mode = "both" if kind == EMBEDDINGS else "batch" if result["batch"] else "online"
                targets = [days.setdefault(bucket["start_time"], _no_usage()),
                           models.setdefault((result["model"] or "unknown", kind, mode), _no_usage())]
                _add_usage(targets + ([modes[mode]] if mode in modes else []), result)
    total = _no_usage()
    _add_usage([total], *days.values())
    chart = bar_chart([(time.strftime("%m-%d", time.gmtime(at)), sums["input_tokens"] + sums["output_tokens"])
                       for at, sums in sorted(days.items())], label="Tokens per day")
    context = {
        "days": [{"date": time.strftime("%Y-%m-%d", time.gmtime(at)), **_usage_text(sums)}
                 for at, sums in sorted(days.items(), reverse=True)],
        "models": [{"model": model, "kind": kind, "mode": mode, **_usage_text(sums)}
                   for (model, kind, mode), sums in sorted(models.items())],
        "modes": {mode: _usage_text(sums) for mode, sums in modes.items()}, "total": _usage_text(total),
        "chart": chart, "first": time.strftime("%Y-%m-%d", time.gmtime(start)), "projects": None}
    if caller.platform_admin:
        per_project: dict[str, dict] = {}
        for kind in (COMPLETIONS, EMBEDDINGS):
            for bucket in buckets(kind, ["project_id"], None):
                for result in bucket["results"]:
                    _add_usage([per_project.setdefault(result["project_id"], _no_usage())], result)
        with db.session() as session:
            names = {row.id: (row.name, row.archived_at) for row in session.query(Project)}
        rows = [{"id": project, "name": names.get(project, (project, None))[0],
                 "archived": bool(names.get(project, (None, None))[1]), "tokens": sums["input_tokens"]
                 + sums["output_tokens"], **_usage_text(sums)}
                for project, sums in ((p, per_project.get(p, _no_usage())) for p in {*names, *per_project})]
        context["projects"] = sorted(rows, key=lambda row: (-row["tokens"], row["name"]))
    return _page(request, "usage.html", role, **context)


def _no_usage() -> dict:
    return {"num_model_requests": 0, "input_tokens": 0, "output_tokens": 0, "engine_seconds": 0.0}


def _add_usage(targets: list[dict], *results: dict) -> None:
    """Add usage results (the usage API's, or sums alike) into each of ``targets``."""
    for result in results:
        for target in targets:
            for name in target:
                target[name] += result.get(name) or 0


def _usage_text(sums: dict) -> dict:
    return {"requests": f"{sums['num_model_requests']:,}", "input_tokens": f"{sums['input_tokens']:,}",
            "output_tokens": f"{sums['output_tokens']:,}", "engine_seconds": f"{sums['engine_seconds']:,.1f}"}


def _disk(request: Request) -> dict:
    """The store's disk as the dashboard shows it: free space, what vbatch keeps by kind, and whether new batches
    are refused for want of space."""
    from vbatch_pipelines.retention import disk_usage, human_bytes

    resources = request.app.state.resources
    usage, floor = disk_usage(resources["file_store"]), resources["retention_policy"].min_free_disk_percent
    return {"free": human_bytes(usage.free), "total": human_bytes(usage.total),
            "free_percent": f"{usage.free_percent:.1f}", "floor": f"{floor:g}",
            "refusing": floor > 0 and usage.free_percent < floor,
            "kinds": [(kind, human_bytes(size)) for kind, size in sorted(usage.kinds.items(), key=lambda kv: -kv[1])
                      if size]}


def _count(value: float | None) -> str:
    return "–" if value is None else str(int(value))


@router.get("/batches", response_class=HTMLResponse)
def batches(request: Request, status: str | None = Query(default=None, max_length=16),
            after: str | None = Query(default=None, max_length=64), role: Role = Depends(console_role),
            caller: Caller = Depends(console_login)) -> HTMLResponse:
    from vbatch_pipelines.store.models import BATCH_STATUSES, Batch

    if status and status not in BATCH_STATUSES:
        status = None
    where = (Batch.project_id == caller.project_id, *((Batch.status == status,) if status else ()))
    with request.app.state.db.session() as session:
        page = _list_page(session, Batch, after, where)
    return _page(request, "batches.html", role, page=page, status=status, statuses=BATCH_STATUSES)


def _list_page(session, model, after: str | None, where=()) -> dict:
    """25 rows (those ``where`` selects: the caller's project's) after ``after``; an ``after`` that is not on the
    list (a stale link, another project's id) starts from the newest."""
    from api.errors import OpenAIError
    from api.pagination import paginate

    try:
        return paginate(session, model, after=after, limit=25, where=where)
    except OpenAIError:
        return paginate(session, model, after=None, limit=25, where=where)


@router.get("/batches/new", response_class=HTMLResponse)
def new_batch(request: Request, error: str | None = None, role: Role = Depends(console_role),
              caller: Caller = Depends(console_login)) -> HTMLResponse:
    from vbatch_pipelines.curation.schemas import SCHEMAS

    registry = request.app.state.resources["model_registry"]
    return _page(request, "new_batch.html", role, models=sorted(registry.served_models(caller.project_id)),
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
        require_free_disk(resources["file_store"], resources["retention_policy"].min_free_disk_percent, "batches")
        stored = store_file(state.db, resources["file_store"].files_dir, source, file.filename or "upload.jsonl",
                            "batch", max_bytes=settings.max_upload_bytes, owner=caller.owner)
        metadata = {"curation": "off"} if curation == "off" else {"curation_schema": schema} if schema else None
        batch = accept_batch(state.db, resources["file_store"], resources["model_registry"], state.batch_launcher,
                             input_file_id=stored.id, endpoint=endpoint, metadata=metadata,
                             inline_validation_bytes=settings.inline_validation_bytes, owner=caller.owner)
    except (BatchRequestError, VbatchError) as exc:
        return RedirectResponse(f"/ui/batches/new?error={quote(str(exc)[:300])}", status_code=303)
    return RedirectResponse(f"/ui/batches/{quote(batch.id)}", status_code=303)


def _with_model(upload, model: str):
    """The upload with ``model`` set in each line's body that names none; a line that is not a JSON object is
    left as it is (validation reports it with its line number)."""
    import json
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
        return _missing(request, role, f"batch {batch_id[:64]}", "/ui/batches")
    return _page(request, "batch.html", role, batch=record.to_openai())


@router.get("/batches/{batch_id}/progress", response_class=HTMLResponse)
def batch_progress(request: Request, batch_id: str, role: Role = Depends(console_role),
                   caller: Caller = Depends(console_login)) -> HTMLResponse:
    """The live part of a batch's page (the page's script swaps it in every 2 s until the batch ends)."""
    from vbatch_pipelines.batch.service import get_batch

    record = of_project(get_batch(request.app.state.db, batch_id[:64]), caller.project_id)
    if record is None:
        return HTMLResponse("<p class=error>This batch is gone.</p>", status_code=404)
    return _page(request, "batch_progress.html", role, batch=record.to_openai())


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
        return _missing(request, role, f"file {file_id[:64]}", "/ui/batches")
    return FileResponse(record.path, media_type="application/octet-stream", filename=record.filename)


def comparison_verdict(comparison: dict | None) -> str | None:
    """One line for a comparison: how the fine-tune's normalized match moved against its base model's."""
    if not comparison or not comparison.get("examples"):
        return None
    base = (comparison.get("base") or {}).get("normalized_match")
    tuned = (comparison.get("fine_tuned") or {}).get("normalized_match")
    if base is None or tuned is None:
        return None
    word = "better" if tuned > base else "worse" if tuned < base else "the same"
    return f"{word}: {base:g} → {tuned:g} normalized match on {comparison['examples']} examples"


@router.get("/fine-tunes", response_class=HTMLResponse)
def fine_tunes(request: Request, after: str | None = Query(default=None, max_length=64),
               role: Role = Depends(console_role), caller: Caller = Depends(console_login)) -> HTMLResponse:
    from vbatch_pipelines.store.models import FineTuningJob

    with request.app.state.db.session() as session:
        page = _list_page(session, FineTuningJob, after, (FineTuningJob.project_id == caller.project_id,))
        jobs = {row.id: row for row in session.query(FineTuningJob).filter(
            FineTuningJob.id.in_([job["id"] for job in page["data"]]))}
    for job in page["data"]:
        job["verdict"] = comparison_verdict(jobs[job["id"]].comparison)
        job["deployed"] = jobs[job["id"]].deployed
    return _page(request, "fine_tunes.html", role, page=page)


@router.get("/fine-tunes/new", response_class=HTMLResponse)
def new_fine_tune(request: Request, error: str | None = None, role: Role = Depends(console_role),
                  caller: Caller = Depends(console_login)) -> HTMLResponse:
    """The form: the base models that generate text, and the caller's project's dataset versions."""
    from vbatch_pipelines.curation.service import ready_datasets
    from vbatch_pipelines.models.registry import GENERATE

    registry = request.app.state.resources["model_registry"]
    with request.app.state.db.session() as session:
        versions = [{"version": row.version, "kind": row.kind}
                    for row in session.scalars(ready_datasets(caller.project_id, None).limit(50))]
    return _page(request, "new_fine_tune.html", role, error=error, versions=versions,
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
        job = start_fine_tune(state.db, resources["model_registry"], resources["file_store"], resources["trainer"],
                              state.settings.dagster_url, model=model, training_file=training.strip(),
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
        return _missing(request, role, f"fine-tune {job_id[:64]}", "/ui/fine-tunes")
    checkpoints, more_checkpoints = list_checkpoints(db, job.id, after=None, limit=5)
    return _page(request, "fine_tune.html", role, job=job.to_openai(), comparison=job.comparison,
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
        deploy_on_request(state.db, state.resources["model_registry"], state.engines.resource, job)
    except VbatchError as exc:
        return RedirectResponse(f"{target}?error={quote(str(exc)[:300])}", status_code=303)
    except Exception as exc:  # noqa: BLE001 - the engine's refusal, shown on the page
        return RedirectResponse(f"{target}?error={quote(f'The engine did not load it: {exc}'[:300])}", status_code=303)
    console_audit(request, "fine_tune.deployed", job.id, model=job.fine_tuned_model)
    return RedirectResponse(target, status_code=303)


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, error: str | None = None, role: Role = Depends(console_role),
           caller: Caller = Depends(console_login)) -> HTMLResponse:
    """Base models, and the fine-tunes the caller's project may use (its own and shared ones); only its own
    fine-tunes can be undeployed from here."""
    from vbatch_pipelines.models.registry import EMBED, GENERATE
    from vbatch_pipelines.store.models import Model

    registry = request.app.state.resources["model_registry"]
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
    return _page(request, "models.html", role, models=rows, error=error)


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
        return _missing(request, role, f"model {model_id[:512]}", "/ui/models")
    details = dict(row.details or {})
    return _page(request, "model_status.html", role, model=row, fit=details.get("fit") or {},
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
        row = start_install(state.db, state.resources["model_registry"], state.engines.resource,
                            state.settings.dagster_url, source.strip(), model_id=model_id.strip() or None)
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
        remove_model(state.db, state.resources["model_registry"], state.engines.resource, model_id[:512],
                     caller.project_id)
    except VbatchError as exc:
        return RedirectResponse(f"/ui/models?error={quote(str(exc)[:300])}", status_code=303)
    state.engines.forget(model_id[:512])
    console_audit(request, "model.deleted", model_id[:512], kind=row.kind if row is not None else "alias")
    return RedirectResponse("/ui/models", status_code=303)


# -- projects and keys (platform admins) ------------------------------------------------------------------------


def _projects_page(request: Request, role: Role, error: str | None = None) -> HTMLResponse:
    from sqlalchemy import func, select

    from vbatch_pipelines.store.models import ApiKey, Project

    if role != "admin":
        return _page(request, "projects.html", role, projects=[], error="Projects are managed with an admin key.")
    with request.app.state.db.session() as session:
        counts = dict(session.execute(select(ApiKey.project_id, func.count()).where(ApiKey.revoked_at.is_(None))
                                      .group_by(ApiKey.project_id)).all())
        rows = [{**project.to_openai(), "keys": counts.get(project.id, 0)}
                for project in session.scalars(select(Project).order_by(Project.created_at, Project.id))]
    return _page(request, "projects.html", role, projects=rows, error=error)


@router.get("/projects", response_class=HTMLResponse)
def projects_page(request: Request, error: str | None = Query(default=None, max_length=300),
                  role: Role = Depends(console_role)) -> HTMLResponse:
    return _projects_page(request, role, error)


@router.post("/projects")
def create_project_from_form(request: Request, name: str = Form(max_length=128),
                             role: Role = Depends(console_role)) -> Response:
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.projects import create_project

    if role != "admin":
        return _projects_page(request, role)
    try:
        project = create_project(request.app.state.db, name)
    except VbatchError as exc:
        return RedirectResponse(f"/ui/projects?error={quote(str(exc)[:300])}", status_code=303)
    console_audit(request, "project.created", project.id, name=project.name)
    return RedirectResponse(f"/ui/projects/{quote(project.id)}", status_code=303)


def _project_page(request: Request, role: Role, project_id: str, error: str | None = None, new_key=None,
                  new_secret: str | None = None) -> HTMLResponse:
    from vbatch_pipelines.errors import NotFound
    from vbatch_pipelines.projects import get_project, list_keys

    if role != "admin":
        return _projects_page(request, role)
    db = request.app.state.db
    try:
        project = get_project(db, project_id[:64])
    except NotFound:
        return _page(request, "missing.html", role, what=f"project {project_id[:64]}", back="/ui/projects")
    keys = [{**key.to_openai(), "owner": key.owner, "last_used": time.strftime("%Y-%m-%d %H:%M",
             time.localtime(key.last_used_at)) if key.last_used_at else None} for key in list_keys(db, project.id)]
    return _page(request, "project.html", role, project=project.to_openai(), keys=keys, error=error,
                 new_key=new_key, new_secret=new_secret)


@router.get("/projects/{project_id}", response_class=HTMLResponse)
def project_page(request: Request, project_id: str, error: str | None = Query(default=None, max_length=300),
                 role: Role = Depends(console_role)) -> HTMLResponse:
    return _project_page(request, role, project_id, error)


@router.post("/projects/{project_id}/keys", response_class=HTMLResponse)
def create_key_from_form(request: Request, project_id: str, name: str = Form(max_length=128),
                         owner: str = Form(max_length=256), key_role: str = Form("member", alias="role", max_length=16),
                         role: Role = Depends(console_role)) -> Response:
    """The new key's secret is on the page this answer renders, this once (never in a URL or a redirect)."""
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.projects import create_key

    if role != "admin":
        return _projects_page(request, role)
    try:
        key, secret = create_key(request.app.state.db, project_id[:64], name, owner, key_role,
                                 created_by="console (admin)")
    except VbatchError as exc:
        return _project_page(request, role, project_id, error=str(exc)[:300])
    request.app.state.keys_made = True
    console_audit(request, "api_key.created", key.id, name=key.name, owner=key.owner, role=key.role,
                  project_id=key.project_id)
    return _project_page(request, role, project_id, new_key=key, new_secret=secret)


@router.post("/projects/{project_id}/keys/{key_id}/revoke")
def revoke_key_from_form(request: Request, project_id: str, key_id: str, role: Role = Depends(console_role)) -> Response:
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.projects import revoke_key

    if role != "admin":
        return _projects_page(request, role)
    try:
        key = revoke_key(request.app.state.db, key_id[:64], project_id[:64])
    except VbatchError as exc:
        return RedirectResponse(f"/ui/projects/{quote(project_id[:64])}?error={quote(str(exc)[:300])}",
                                status_code=303)
    console_audit(request, "api_key.revoked", key.id, name=key.name, project_id=key.project_id)
    return RedirectResponse(f"/ui/projects/{quote(project_id[:64])}", status_code=303)


@router.post("/projects/{project_id}/archive")
def archive_project_from_form(request: Request, project_id: str, role: Role = Depends(console_role)) -> Response:
    from vbatch_pipelines.errors import VbatchError
    from vbatch_pipelines.projects import archive_project

    if role != "admin":
        return _projects_page(request, role)
    try:
        archive_project(request.app.state.db, project_id[:64])
    except VbatchError as exc:
        return RedirectResponse(f"/ui/projects/{quote(project_id[:64])}?error={quote(str(exc)[:300])}",
                                status_code=303)
    console_audit(request, "project.archived", project_id[:64])
    return RedirectResponse("/ui/projects", status_code=303)


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, after: str | None = Query(default=None, max_length=64),
               role: Role = Depends(console_role)) -> HTMLResponse:
    """Who did what and when, newest first (platform admins), as ``GET /v1/organization/audit_logs``."""
    import json as json_module

    from vbatch_pipelines.store.models import AuditEvent

    if role != "admin":
        return _page(request, "audit.html", role, events=[], page={}, error="The audit log needs an admin key.")
    with request.app.state.db.session() as session:
        page = _list_page(session, AuditEvent, after)
        rows = session.query(AuditEvent).filter(AuditEvent.id.in_([e["id"] for e in page["data"]])).all()
    by_id = {row.id: row for row in rows}
    events = [{"when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.created_at)), "type": row.type,
               "target": row.target, "actor": row.actor, "project_id": row.project_id,
               "details": json_module.dumps(row.details) if row.details else ""}
              for row in (by_id[e["id"]] for e in page["data"])]
    return _page(request, "audit.html", role, events=events, page=page)


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


@router.get("/evals", response_class=HTMLResponse)
def eval_sets(request: Request, role: Role = Depends(console_role),
              caller: Caller = Depends(console_login)) -> HTMLResponse:
    from sqlalchemy import select

    from vbatch_pipelines.store.models import EvalSet

    with request.app.state.db.session() as session:
        rows = [row.to_openai() for row in session.scalars(select(EvalSet).where(
            EvalSet.project_id == caller.project_id).order_by(EvalSet.created_at.desc()).limit(100))]
    return _page(request, "evals.html", role, sets=rows)


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
        return _missing(request, role, f"evaluation set {eval_id[:64]}", "/ui/evals")
    registry = request.app.state.resources["model_registry"]
    models = sorted(name for name, spec in registry.served_models(project=caller.project_id).items()
                    if spec.task == GENERATE)
    return _page(request, "eval.html", role, set=found.to_openai(), leaderboard=evals.leaderboard(db, found.id),
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
        start_eval_run(state.db, state.resources["model_registry"], state.settings.dagster_url, eval_id[:64], model,
                       owner=caller.owner)
    except VbatchError as exc:
        return RedirectResponse(f"{back}?error={quote(str(exc)[:300])}", status_code=303)
    return RedirectResponse(back, status_code=303)


@router.get("/datasets", response_class=HTMLResponse)
def datasets(request: Request, role: Role = Depends(console_role),
             caller: Caller = Depends(console_login)) -> HTMLResponse:
    from vbatch_pipelines.curation.service import ready_datasets

    with request.app.state.db.session() as session:
        rows = [row.to_api() for row in session.scalars(ready_datasets(caller.project_id, None).limit(50))]
    return _page(request, "datasets.html", role, datasets=rows)


@router.get("/datasets/{version}", response_class=HTMLResponse)
def dataset(request: Request, version: str, role: Role = Depends(console_role),
            caller: Caller = Depends(console_login)) -> HTMLResponse:
    from vbatch_pipelines.curation.dataset import export_path
    from vbatch_pipelines.store.models import EXPORT_FORMATS, PREFERENCE

    record = _ready_dataset(request, version, caller)
    if record is None:
        return _missing(request, role, f"dataset version {version[:32]}", "/ui/datasets")
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
    return _page(request, "dataset.html", role, dataset=record.to_api(), formats=EXPORT_FORMATS[record.kind],
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
        return _missing(request, role, f"dataset version {version[:32]}", "/ui/datasets")
    try:
        path = export_path(record, format, split)
    except UnknownFormat as exc:
        return _page(request, "missing.html", role, what=str(exc), back=f"/ui/datasets/{quote(record.version)}")
    return FileResponse(path, filename=export_filename(record, path),
                        media_type="application/octet-stream")


def install(app, extensions: list | None = None) -> None:
    """Mount the console, its static files and the enabled extensions' pages (``/ui/ext/<name>/``, their links
    in the nav) on the API's app."""
    from fastapi.staticfiles import StaticFiles

    from api.console.review import router as review_router

    app.include_router(router)
    app.include_router(review_router)
    app.state.console_links = []
    for extension in extensions or []:
        if extension.console is not None:
            app.include_router(extension.console(), prefix=f"/ui/ext/{extension.name}",
                               dependencies=[Depends(console_login)], include_in_schema=False)
            app.state.console_links += [(label, f"/ui/ext/{extension.name}/{path.lstrip('/')}")
                                        for label, path in extension.console_links]
    app.mount("/ui/static", StaticFiles(directory=str(HERE / "static")), name="console-static")

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/ui/login?next={quote(_safe_next(exc.next_path))}", status_code=303)
