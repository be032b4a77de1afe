"""GET /metrics: the platform in Prometheus' text format (names prefixed ``vbatch_``), computed when scraped
(``vbatch_pipelines.metrics``), so every API worker answers alike. GET /metrics/targets: the engines vbatch
runs, in Prometheus' HTTP service-discovery format (their ports change as they restart)."""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from api.deps import require_admin

router = APIRouter(tags=["operations"])


class ScrapeTarget(BaseModel):
    """One target group of Prometheus' HTTP service discovery."""

    targets: list[str]
    labels: dict[str, str]


@router.get("/metrics", response_class=Response, responses={200: {
    "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}, "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    """Batches by status, requests and tokens by model, queue depth, reviews and gold stars, fine-tunes by
    status, each also by `project` (the project's id); usage as the usage API counts it, batch and online
    (`vbatch_usage_requests_total`, `vbatch_usage_tokens_total`, `vbatch_usage_engine_seconds_total`, by project,
    model, usage type and batch); services and engines, the disk (bytes by kind, free and total); for Prometheus
    (`deploy/prometheus.yml`) or a look with curl."""
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/targets", response_class=JSONResponse, response_model=list[ScrapeTarget],
            dependencies=[Depends(require_admin)])
def metric_targets(request: Request) -> JSONResponse:
    """Each engine (every replica, on every node) as a scrape target (``http_sd_configs`` in
    `deploy/prometheus.yml`), labelled with its model and node: vLLM's own ``/metrics`` (requests running and
    waiting, KV-cache use, tokens). Admin keys only: it tells where every engine listens."""
    from vbatch_pipelines.metrics import engine_states

    engines = engine_states(request.app.state.resources.inference_engine)
    targets = []
    for engine in engines:
        if engine.up:
            url = urlsplit(engine.url)
            targets.append({"targets": [url.netloc], "labels": {"model": engine.model, "node": engine.node,
                                                                 "__scheme__": url.scheme}})
    return JSONResponse(targets)
