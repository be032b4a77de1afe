"""The dashboard and the usage page."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from api.console import (
    comparison_verdict,
    console_login,
    console_role,
    render,
)
from api.deps import Role
from vbatch_pipelines.projects import Caller

router = APIRouter(prefix="/ui", include_in_schema=False)


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
               for engine in engines_with_stats(request.app.state.resources.inference_engine)]
    today = summarize(db, ended_since=midnight, project_id=project_id)
    costs = {}
    hour_cost = request.app.state.settings.api.gpu_hour_cost
    if hour_cost is not None:
        for model, seconds in busy_seconds(db, ended_since=midnight, project_id=project_id).items():
            cost = seconds / 3600 * hour_cost
            tokens = sum(today.tokens.get(model, (0, 0)))
            costs[model] = {"busy": f"{seconds / 60:.1f} min", "cost": f"{cost:.4f}",
                            "per_1k": f"{1000 * cost / tokens:.6f}" if tokens else "–"}
    return render(request, "dashboard.html", role, summary=summarize(db, project_id=project_id), today=today,
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
    return render(request, "usage.html", role, **context)


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
    usage, floor = disk_usage(resources.file_store), resources.retention_policy.min_free_disk_percent
    return {"free": human_bytes(usage.free), "total": human_bytes(usage.total),
            "free_percent": f"{usage.free_percent:.1f}", "floor": f"{floor:g}",
            "refusing": floor > 0 and usage.free_percent < floor,
            "kinds": [(kind, human_bytes(size)) for kind, size in sorted(usage.kinds.items(), key=lambda kv: -kv[1])
                      if size]}


def _count(value: float | None) -> str:
    return "–" if value is None else str(int(value))
