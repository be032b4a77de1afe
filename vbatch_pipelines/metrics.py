"""The platform's Prometheus metrics, read when scraped: from the metadata DB (batches, requests, tokens,
reviews, fine-tunes), the supervisor's service record and the engines' state files and own ``/metrics``.
No process counts anything in memory, so every API worker answers the same and a restart loses nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import BATCH_STATUSES, FINE_TUNING_STATUSES, Batch, CurationTask, FineTuningJob

# What the dashboard shows of each vLLM engine (names as vLLM exports them).
ENGINE_GAUGES = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
                 "vllm:kv_cache_usage_perc": "kv_cache_usage"}
ENGINE_COUNTERS = {"vllm:prompt_tokens": "prompt_tokens", "vllm:generation_tokens": "generation_tokens"}


@dataclass
class EngineState:
    """One engine: one this node started (its state file) or one the engine registry knows on another node or
    outside (VBATCH_ENGINES), and what its ``/metrics`` said."""

    model: str
    url: str
    pid: int | None
    up: bool = False
    stats: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    node: str = "local"
    kind: str = "managed"


def engine_states(inference_engine) -> list[EngineState]:
    """The engines this node started (its state files, alive or not), then every other one the engine registry
    knows: managed on other nodes, or external (stopped ones left out)."""
    from vbatch_pipelines.detached import pid_alive

    engines_dir, registry, node = inference_engine.engines_dir, inference_engine.registry(), inference_engine.node
    engines = []
    for path in sorted(engines_dir.glob("*.json")) if engines_dir.is_dir() else []:
        try:
            state = json.loads(path.read_text())
            model, port, pid = state["model"], int(state["port"]), int(state["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        engines.append(EngineState(model=model, url=f"http://127.0.0.1:{port}", pid=pid, up=pid_alive(pid),
                                   node=node))
    for replica in registry.replicas():
        if (replica.kind == "managed" and replica.node == node) or replica.status == "stopped":
            continue  # this node's own are its state files
        # Checked now, whatever was last recorded: a replica marked down may be back.
        engines.append(EngineState(model=replica.model, url=replica.base_url, pid=replica.pid, up=True,
                                   node=replica.node, kind=replica.kind))
    return engines


def read_engine_metrics(engine: EngineState, get: Callable[[str], str]) -> EngineState:
    """Fill ``engine.stats`` from its Prometheus text (``get(url)`` fetches it); a failure is recorded, not
    raised: a dashboard shows an engine that does not answer as such."""
    if not engine.up:
        return engine
    try:
        text = get(f"{engine.url}/metrics")
    except Exception as exc:  # noqa: BLE001 - down, starting or hung: say so
        engine.up, engine.error = False, f"{type(exc).__name__}: {exc}"
        return engine
    stats: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        name = ENGINE_GAUGES.get(family.name) or ENGINE_COUNTERS.get(family.name)
        if name is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            stats[name] = stats.get(name, 0.0) + sample.value  # summed over the engine's label sets
    engine.stats = stats
    return engine


def engines_with_stats(inference_engine) -> list[EngineState]:
    """Every engine (``engine_states``) with what its own ``/metrics`` says now: asked side by side, 2 s at most
    in all, so a scrape or the dashboard does not wait 2 s per replica that does not answer."""
    from concurrent.futures import ThreadPoolExecutor

    from vbatch_pipelines.net import local_http

    def fetch(url: str) -> str:
        response = local_http().get(url, timeout=2.0)
        response.raise_for_status()
        return response.text

    engines = engine_states(inference_engine)
    if len(engines) <= 1:
        return [read_engine_metrics(engine, fetch) for engine in engines]
    with ThreadPoolExecutor(max_workers=min(len(engines), 16)) as pool:
        return list(pool.map(lambda engine: read_engine_metrics(engine, fetch), engines))


# When a batch ended, whichever way it did.
BATCH_ENDED_AT = func.coalesce(Batch.completed_at, Batch.cancelled_at, Batch.expired_at, Batch.failed_at)


@dataclass
class PlatformSummary:
    """What the metadata DB says of the platform: the figures ``/metrics`` and the console's dashboard show."""

    batches: dict[str, int]  # by status
    waiting: int  # accepted, no run working on them yet
    requests: dict[str, tuple[int, int]]  # model -> (completed, failed)
    tokens: dict[str, tuple[int, int]]  # model -> (input, output)
    reviewed: int
    pending_review: int
    gold_stars: int
    fine_tunes: dict[str, int]  # by status


def _of_project(model, project_id: str | None) -> tuple:
    """The WHERE clause that keeps ``model``'s rows of ``project_id`` (none: every project's)."""
    return () if project_id is None else (model.project_id == project_id,)


def summarize(db: Database, *, ended_since: int | None = None, project_id: str | None = None) -> PlatformSummary:
    """The platform's figures (with ``project_id``, that project's only: the console's dashboard); with
    ``ended_since`` (a Unix time) requests and tokens count only batches that ended since then (the dashboard's
    "today")."""
    batches, tasks, jobs_of = (_of_project(model, project_id) for model in (Batch, CurationTask, FineTuningJob))
    per_model = select(Batch.model, func.sum(Batch.request_completed), func.sum(Batch.request_failed),
                       func.sum(Batch.usage["input_tokens"].as_integer()),
                       func.sum(Batch.usage["output_tokens"].as_integer())).where(*batches).group_by(Batch.model)
    if ended_since is not None:
        per_model = per_model.where(BATCH_ENDED_AT >= ended_since)
    with db.engine.connect() as conn:
        statuses = dict(conn.execute(select(Batch.status, func.count()).where(*batches)
                                     .group_by(Batch.status)).all())
        models = conn.execute(per_model).all()
        waiting = conn.execute(select(func.count()).select_from(Batch).where(
            *batches, Batch.status.in_(("validating", "in_progress")), Batch.lease_owner.is_(None))).scalar_one()
        total, reviewed, gold = conn.execute(select(
            func.count(), func.count().filter(CurationTask.annotated.is_(True)),
            func.count().filter(CurationTask.gold_star.is_(True))).select_from(CurationTask).where(*tasks)).one()
        jobs = dict(conn.execute(select(FineTuningJob.status, func.count()).where(*jobs_of)
                                 .group_by(FineTuningJob.status)).all())
    return PlatformSummary(
        batches={status: statuses.get(status, 0) for status in BATCH_STATUSES}, waiting=waiting,
        requests={model or "unknown": (completed or 0, failed or 0) for model, completed, failed, _, _ in models},
        tokens={model or "unknown": (i or 0, o or 0) for model, _, _, i, o in models},
        reviewed=reviewed, pending_review=total - reviewed, gold_stars=gold,
        fine_tunes={status: jobs.get(status, 0) for status in FINE_TUNING_STATUSES})


def busy_seconds(db: Database, *, ended_since: int, project_id: str | None = None) -> dict[str, float]:
    """Per model, how long batches (of ``project_id`` only, when given) kept its engine busy among those that
    ended since ``ended_since``: the union of their in-progress spans (batches side by side count once)."""
    with db.engine.connect() as conn:
        rows = conn.execute(select(Batch.model, Batch.in_progress_at, BATCH_ENDED_AT).where(
            *_of_project(Batch, project_id), BATCH_ENDED_AT >= ended_since, Batch.in_progress_at.is_not(None))).all()
    spans: dict[str, list[tuple[int, int]]] = {}
    for model, start, end in rows:
        spans.setdefault(model or "unknown", []).append((start, max(start, end)))
    busy = {}
    for model, intervals in spans.items():
        total, current_start, current_end = 0, None, None
        for start, end in sorted(intervals):
            if current_end is None or start > current_end:
                total += (current_end - current_start) if current_end is not None else 0
                current_start, current_end = start, end
            else:
                current_end = max(current_end, end)
        total += current_end - current_start
        busy[model] = float(total)
    return busy


def gold_stars_by_day(db: Database, *, days: int, project_id: str | None = None) -> list[tuple[str, int]]:
    """Gold stars given (in ``project_id`` only, when given) on each of the last ``days`` days (by review time,
    local dates), oldest first."""
    import datetime as dt

    today = dt.date.today()
    first = today - dt.timedelta(days=days - 1)
    since = int(time.mktime(first.timetuple()))
    with db.engine.connect() as conn:
        stamps = conn.execute(select(CurationTask.reviewed_at).where(
            *_of_project(CurationTask, project_id), CurationTask.gold_star.is_(True),
            CurationTask.reviewed_at >= since)).scalars().all()
    counts = {first + dt.timedelta(days=n): 0 for n in range(days)}
    for stamp in stamps:
        day = dt.date.fromtimestamp(stamp)
        if day in counts:
            counts[day] += 1
    return [(day.isoformat(), count) for day, count in counts.items()]


class PlatformCollector(Collector):
    """Everything ``GET /metrics`` reports, computed at scrape time (the disk's use by kind at most once a minute:
    measuring it walks the store)."""

    def __init__(self, db: Database, *, services: Callable[[], dict[str, dict[str, Any]]],
                 engines: Callable[[], list[EngineState]], dagster_queued: Callable[[], int | None],
                 disk: Callable[[], Any] | None = None):
        self.db, self.services, self.engines, self.dagster_queued = db, services, engines, dagster_queued
        self.disk = disk

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        yield from self._summary(summarize(self.db))
        yield from self._services()
        yield from self._engines()
        if self.disk is not None:
            yield from self._disk(self.disk())
        queued = self.dagster_queued()
        if queued is not None:
            yield GaugeMetricFamily("vbatch_dagster_runs_queued", "Dagster runs queued, not yet started",
                                    value=queued)
        yield GaugeMetricFamily("vbatch_scrape_duration_seconds", "Time this scrape took to compute",
                                value=time.monotonic() - started)

    @staticmethod
    def _summary(summary: PlatformSummary) -> Iterator[Metric]:
        by_status = GaugeMetricFamily("vbatch_batches", "Batches by status", labels=["status"])
        for status, count in summary.batches.items():
            by_status.add_metric([status], count)
        requests = CounterMetricFamily("vbatch_requests", "Batch requests finished, by model and outcome",
                                       labels=["model", "outcome"])
        for model, (completed, failed) in summary.requests.items():
            requests.add_metric([model, "completed"], completed)
            requests.add_metric([model, "failed"], failed)
        tokens = CounterMetricFamily("vbatch_tokens", "Tokens of finished batch requests, by model and kind",
                                     labels=["model", "kind"])
        for model, (input_tokens, output_tokens) in summary.tokens.items():
            tokens.add_metric([model, "input"], input_tokens)
            tokens.add_metric([model, "output"], output_tokens)
        tasks = GaugeMetricFamily("vbatch_curation_tasks", "Results sent to review, by state", labels=["state"])
        tasks.add_metric(["reviewed"], summary.reviewed)
        tasks.add_metric(["pending"], summary.pending_review)
        jobs = GaugeMetricFamily("vbatch_fine_tunes", "Fine-tuning jobs by status", labels=["status"])
        for status, count in summary.fine_tunes.items():
            jobs.add_metric([status], count)
        yield by_status
        yield GaugeMetricFamily("vbatch_batches_waiting", "Batches accepted and not yet run by any run (the "
                                "queue in front of the engine)", value=summary.waiting)
        yield requests
        yield tokens
        yield tasks
        yield GaugeMetricFamily("vbatch_gold_stars", "Results marked gold stars", value=summary.gold_stars)
        yield jobs

    def _services(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("vbatch_service_up", "Whether a supervised service runs", labels=["service"])
        restarts = CounterMetricFamily("vbatch_service_restarts", "Restarts of a supervised service by `vbatch up`",
                                       labels=["service"])
        for name, service in sorted(self.services().items()):
            up.add_metric([name], 1 if service.get("running") else 0)
            restarts.add_metric([name], service.get("restarts", 0))
        yield up
        yield restarts

    def _engines(self) -> Iterator[Metric]:
        labels = ["model", "node", "url"]  # a model may have several replicas, on several nodes
        up = GaugeMetricFamily("vbatch_engine_up", "Whether an engine (a replica of a model) answers", labels=labels)
        gauges = {name: GaugeMetricFamily(f"vbatch_engine_{name}", f"vLLM's {source}, per replica",
                                          labels=labels) for source, name in ENGINE_GAUGES.items()}
        for engine in self.engines():
            values = [engine.model, engine.node, engine.url]
            up.add_metric(values, 1 if engine.up else 0)
            for name, family in gauges.items():
                if name in engine.stats:
                    family.add_metric(values, engine.stats[name])
        yield up
        yield from gauges.values()

    @staticmethod
    def _disk(usage) -> Iterator[Metric]:
        """``retention.DiskUsage``: bytes by kind, and the free and total bytes of the store's filesystem."""
        by_kind = GaugeMetricFamily("vbatch_disk_bytes", "Bytes vbatch keeps on disk, by kind (files, batches, "
                                    "datasets, fine_tunes, models, dagster, logs, engines, label_studio, database)",
                                    labels=["kind"])
        for kind, size in usage.kinds.items():
            by_kind.add_metric([kind], size)
        yield by_kind
        yield GaugeMetricFamily("vbatch_disk_free_bytes", "Bytes free on the filesystem of the file store",
                                value=usage.free)
        yield GaugeMetricFamily("vbatch_disk_total_bytes", "Size of the filesystem of the file store",
                                value=usage.total)
