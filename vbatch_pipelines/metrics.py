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
    """What the metadata DB says of the platform (or of one project): the figures ``/metrics`` and the console's
    dashboard show."""

    batches: dict[str, int]  # by status
    waiting: int  # accepted, no run working on them yet
    requests: dict[str, tuple[int, int]]  # model -> (completed, failed)
    tokens: dict[str, tuple[int, int]]  # model -> (input, output)
    reviewed: int
    pending_review: int
    gold_stars: int
    fine_tunes: dict[str, int]  # by status

    @classmethod
    def empty(cls) -> PlatformSummary:
        return cls(batches=dict.fromkeys(BATCH_STATUSES, 0), waiting=0, requests={}, tokens={}, reviewed=0,
                   pending_review=0, gold_stars=0, fine_tunes=dict.fromkeys(FINE_TUNING_STATUSES, 0))

    def add(self, other: PlatformSummary) -> PlatformSummary:
        """This summary with ``other``'s figures added (another project's: the platform's are the sum)."""
        def pairs(a: dict[str, tuple[int, int]], b: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
            return {k: tuple(x + y for x, y in zip(a.get(k, (0, 0)), b.get(k, (0, 0)))) for k in {**a, **b}}

        return PlatformSummary(
            batches={k: v + other.batches.get(k, 0) for k, v in self.batches.items()},
            waiting=self.waiting + other.waiting, requests=pairs(self.requests, other.requests),
            tokens=pairs(self.tokens, other.tokens), reviewed=self.reviewed + other.reviewed,
            pending_review=self.pending_review + other.pending_review, gold_stars=self.gold_stars + other.gold_stars,
            fine_tunes={k: v + other.fine_tunes.get(k, 0) for k, v in self.fine_tunes.items()})


def _of_project(model, project_id: str | None) -> tuple:
    """The WHERE clause that keeps ``model``'s rows of ``project_id`` (none: every project's)."""
    return () if project_id is None else (model.project_id == project_id,)


def summaries(db: Database, *, ended_since: int | None = None,
              project_id: str | None = None) -> dict[str, PlatformSummary]:
    """The platform's figures per project (``/metrics``' ``project`` label): every active project (zeros for one
    with nothing yet) and any other that has rows; with ``project_id``, that project's only. With ``ended_since``
    (a Unix time) requests and tokens count only batches that ended since then (the dashboard's "today"). The
    same few GROUP BY queries whatever the number of projects."""
    from vbatch_pipelines.store.models import Project

    batches, tasks, jobs_of = (_of_project(model, project_id) for model in (Batch, CurationTask, FineTuningJob))
    per_model = (select(Batch.project_id, Batch.model, func.sum(Batch.request_completed),
                        func.sum(Batch.request_failed), func.sum(Batch.usage["input_tokens"].as_integer()),
                        func.sum(Batch.usage["output_tokens"].as_integer()))
                 .where(*batches).group_by(Batch.project_id, Batch.model))
    if ended_since is not None:
        per_model = per_model.where(BATCH_ENDED_AT >= ended_since)
    with db.engine.connect() as conn:
        projects = [project_id] if project_id is not None else \
            conn.execute(select(Project.id).where(Project.archived_at.is_(None))).scalars().all()
        found = {project: PlatformSummary.empty() for project in projects}

        def of(project: str | None) -> PlatformSummary:
            return found.setdefault(project or "unknown", PlatformSummary.empty())

        for project, status, count in conn.execute(select(Batch.project_id, Batch.status, func.count())
                                                   .where(*batches).group_by(Batch.project_id, Batch.status)):
            of(project).batches[status] = count
        for project, model, completed, failed, tokens_in, tokens_out in conn.execute(per_model):
            summary = of(project)
            summary.requests[model or "unknown"] = (completed or 0, failed or 0)
            summary.tokens[model or "unknown"] = (tokens_in or 0, tokens_out or 0)
        for project, count in conn.execute(select(Batch.project_id, func.count()).where(
                *batches, Batch.status.in_(("validating", "in_progress")), Batch.lease_owner.is_(None))
                .group_by(Batch.project_id)):
            of(project).waiting = count
        for project, total, reviewed, gold in conn.execute(select(
                CurationTask.project_id, func.count(), func.count().filter(CurationTask.annotated.is_(True)),
                func.count().filter(CurationTask.gold_star.is_(True))).where(*tasks)
                .group_by(CurationTask.project_id)):
            summary = of(project)
            summary.reviewed, summary.pending_review, summary.gold_stars = reviewed, total - reviewed, gold
        for project, status, count in conn.execute(select(FineTuningJob.project_id, FineTuningJob.status,
                                                          func.count()).where(*jobs_of)
                                                   .group_by(FineTuningJob.project_id, FineTuningJob.status)):
            of(project).fine_tunes[status] = count
    return found


def summarize(db: Database, *, ended_since: int | None = None, project_id: str | None = None) -> PlatformSummary:
    """The platform's figures (with ``project_id``, that project's only: the console's dashboard); with
    ``ended_since`` (a Unix time) requests and tokens count only batches that ended since then (the dashboard's
    "today")."""
    found = summaries(db, ended_since=ended_since, project_id=project_id)
    if project_id is not None:
        return found[project_id]
    total = PlatformSummary.empty()
    for summary in found.values():
        total = total.add(summary)
    return total


# A usage row is written within seconds of its minute (a batch's when it ends, online requests' by the next flush);
# one older than this is taken as final.
USAGE_SETTLED_S = 86400
UsageKey = tuple[str, str, str, bool]  # project, model, kind (completions | embeddings), batch


class UsageTotals:
    """``usage_records`` summed per project, model, kind and batch-or-online since the first (``/metrics``' usage
    counters). Rows older than ``USAGE_SETTLED_S`` are summed once and kept; each call sums only the rows newer
    than that (plus those that became that old since the last call): two GROUP BYs over a range of the ``minute``
    index, not the whole table. The first call in a process reads everything once."""

    def __init__(self, db: Database, *, settled_s: int = USAGE_SETTLED_S):
        import threading

        self.db, self.settled_s = db, settled_s
        self._settled: dict[UsageKey, tuple[int, int, int, float]] = {}
        self._settled_until: int | None = None  # rows with minute below this are in _settled
        self._lock = threading.Lock()

    def _sums(self, conn, since: int | None, before: int | None) -> dict[UsageKey, tuple[int, int, int, float]]:
        from vbatch_pipelines.store.models import UsageRecord as U

        query = select(U.project_id, U.model, U.kind, U.batch, func.sum(U.requests), func.sum(U.input_tokens),
                       func.sum(U.output_tokens), func.sum(U.engine_seconds)).group_by(U.project_id, U.model, U.kind,
                                                                                      U.batch)
        if since is not None:
            query = query.where(U.minute >= since)
        if before is not None:
            query = query.where(U.minute < before)
        return {(project, model or "unknown", kind, bool(batch)): (int(n or 0), int(i or 0), int(o or 0),
                                                                  float(s or 0))
                for project, model, kind, batch, n, i, o, s in conn.execute(query)}

    @staticmethod
    def _add(into: dict, sums: dict) -> None:
        for key, values in sums.items():
            into[key] = tuple(a + b for a, b in zip(into.get(key, (0, 0, 0, 0.0)), values))

    def totals(self, now: float | None = None) -> dict[UsageKey, tuple[int, int, int, float]]:
        """(requests, input tokens, output tokens, engine seconds) per key, all time."""
        horizon = int((time.time() if now is None else now) - self.settled_s) // 60 * 60
        with self._lock, self.db.engine.connect() as conn:
            if self._settled_until is None or horizon > self._settled_until:
                self._add(self._settled, self._sums(conn, self._settled_until, horizon))
                self._settled_until = horizon
            totals = dict(self._settled)
            self._add(totals, self._sums(conn, self._settled_until, None))
        return totals


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
    measuring it walks the store). What belongs to a project (batches, requests, tokens, reviews, fine-tunes,
    usage) carries a ``project`` label, the project's id: ``sum by (model)`` still gives the platform's figures."""

    def __init__(self, db: Database, *, services: Callable[[], dict[str, dict[str, Any]]],
                 engines: Callable[[], list[EngineState]], dagster_queued: Callable[[], int | None],
                 disk: Callable[[], Any] | None = None):
        self.db, self.services, self.engines, self.dagster_queued = db, services, engines, dagster_queued
        self.disk = disk
        self.usage = UsageTotals(db)

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        yield from self._summary(summaries(self.db))
        yield from self._agreement()
        yield from self._usage(self.usage.totals())
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
    def _summary(by_project: dict[str, PlatformSummary]) -> Iterator[Metric]:
        by_status = GaugeMetricFamily("vbatch_batches", "Batches by status and project", labels=["status", "project"])
        waiting = GaugeMetricFamily("vbatch_batches_waiting", "Batches accepted and not yet run by any run (the "
                                    "queue in front of the engine), by project", labels=["project"])
        requests = CounterMetricFamily("vbatch_requests", "Batch requests finished, by model, outcome and project",
                                       labels=["model", "outcome", "project"])
        tokens = CounterMetricFamily("vbatch_tokens", "Tokens of finished batch requests, by model, kind and project",
                                     labels=["model", "kind", "project"])
        tasks = GaugeMetricFamily("vbatch_curation_tasks", "Results sent to review, by state and project",
                                  labels=["state", "project"])
        gold = GaugeMetricFamily("vbatch_gold_stars", "Results marked gold stars, by project", labels=["project"])
        jobs = GaugeMetricFamily("vbatch_fine_tunes", "Fine-tuning jobs by status and project",
                                 labels=["status", "project"])
        for project, summary in sorted(by_project.items()):
            for status, count in summary.batches.items():
                by_status.add_metric([status, project], count)
            waiting.add_metric([project], summary.waiting)
            for model, (completed, failed) in summary.requests.items():
                requests.add_metric([model, "completed", project], completed)
                requests.add_metric([model, "failed", project], failed)
            for model, (input_tokens, output_tokens) in summary.tokens.items():
                tokens.add_metric([model, "input", project], input_tokens)
                tokens.add_metric([model, "output", project], output_tokens)
            tasks.add_metric(["reviewed", project], summary.reviewed)
            tasks.add_metric(["pending", project], summary.pending_review)
            gold.add_metric([project], summary.gold_stars)
            for status, count in summary.fine_tunes.items():
                jobs.add_metric([status, project], count)
        yield from (by_status, waiting, requests, tokens, tasks, gold, jobs)

    def _agreement(self) -> Iterator[Metric]:
        """How far reviewers agree, in the projects where tasks have two reviewers or more."""
        from vbatch_pipelines.curation.service import agreement_stats

        tasks = GaugeMetricFamily("vbatch_review_agreement", "Mean share of a task's reviewers on the majority's "
                                  "side (tasks with two reviewers or more), by project", labels=["project"])
        reviewers = GaugeMetricFamily("vbatch_reviewer_agreement", "Share of a reviewer's votes that matched the "
                                      "task's outcome (tasks with two reviewers or more)",
                                      labels=["project", "reviewer"])
        with self.db.session() as session:
            projects = session.scalars(select(CurationTask.project_id).where(CurationTask.reviews >= 2)
                                       .distinct()).all()
        for project in sorted(projects):
            found = agreement_stats(self.db, project)
            if found["agreement"] is not None:
                tasks.add_metric([project], found["agreement"])
            for reviewer, mine in sorted(found["by_reviewer"].items()):
                if mine["agreement"] is not None:
                    reviewers.add_metric([project, reviewer], mine["agreement"])
        yield from (tasks, reviewers)

    @staticmethod
    def _usage(totals: dict[UsageKey, tuple[int, int, int, float]]) -> Iterator[Metric]:
        """Usage as ``GET /v1/organization/usage/*`` counts it (``usage_records``): batch and online requests, by
        project, model, usage type (completions | embeddings) and whether it was a batch's."""
        labels = ["project", "model", "usage", "batch"]
        requests = CounterMetricFamily("vbatch_usage_requests", "Requests used (batch and online), by project, "
                                       "model, usage type and batch", labels=labels)
        tokens = CounterMetricFamily("vbatch_usage_tokens", "Tokens used (batch and online), by project, model, "
                                     "usage type, batch and kind (input, output)", labels=[*labels, "kind"])
        seconds = CounterMetricFamily("vbatch_usage_engine_seconds", "Seconds requests held the engine (a batch: "
                                      "from its start to its end), by project, model, usage type and batch",
                                      labels=labels)
        for (project, model, kind, batch), (n, tokens_in, tokens_out, engine_s) in sorted(totals.items()):
            values = [project, model, kind, "true" if batch else "false"]
            requests.add_metric(values, n)
            tokens.add_metric([*values, "input"], tokens_in)
            if kind != "embeddings":  # embeddings have input tokens only
                tokens.add_metric([*values, "output"], tokens_out)
            seconds.add_metric(values, engine_s)
        yield from (requests, tokens, seconds)

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
