"""The vbatch REST front door: OpenAI-compatible, small. It validates, records and launches Dagster
runs; Dagster does the work. Run with ``uvicorn --factory api.main:create_app`` (``vbatch up`` does)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from api import console
from api.deps import EnginePool, caller_of, caller_of_session, caller_role, keys_required
from api.errors import install_error_handlers
from api.guard import BodyLimit, DriveByGuard, KeyBeforeBody, LoginThrottle, NoFraming
from api.probes import BackgroundProbe, FixedState, http_check
from api.routers import batches, completions, curation, evals, files, fine_tuning, metrics, models, organization
from api.schemas import ERRORS, Health
from resources.factory import build_resources
from vbatch_pipelines.extensions import enable
from vbatch_pipelines.launch import BatchLauncher
from vbatch_pipelines.names import WARM_AT_START_ENV
from vbatch_pipelines.processes import ProcessRegistry
from vbatch_pipelines.quotas import TokenBudget
from vbatch_pipelines.settings import Settings, load_settings
from vbatch_pipelines.usage import OnlineUsage

log = logging.getLogger("vbatch.api")
HEALTH_DB_WAIT_S = 0.7  # /health answers within a second, the database's answer or not


class DatabaseProbe:
    """``SELECT 1`` on the metadata DB for /health, in a thread, waited for HEALTH_DB_WAIT_S at most: a stalled
    database makes /health say so at once instead of hanging it (and the event loop with it). One check at a
    time: while one is still waiting, the next /health waits on the same one, so a hung database does not
    collect a thread per probe."""

    def __init__(self, db):
        self.db = db
        self._pending: asyncio.Future | None = None
        self._since = 0.0

    def _ping(self) -> None:
        with self.db.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    async def check(self) -> str:
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(asyncio.to_thread(self._ping))
            self._since = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(self._pending), HEALTH_DB_WAIT_S)
            return "ok"
        except TimeoutError:
            waited = time.monotonic() - self._since
            log.warning("health: the metadata DB has not answered for %.1f s", waited)
            return f"error: not answering (waited {waited:.1f} s)"
        except Exception as exc:  # noqa: BLE001 - report, don't raise (the details go to the log)
            log.warning("health: the metadata DB did not answer: %s", exc)
            return f"error: {type(exc).__name__}"
USAGE_FLUSH_S = 5.0  # online usage reaches the DB (and the usage API) this long after the request at most


def metrics_registry(db, services, inference_engine, file_store=None) -> CollectorRegistry:
    """The registry ``GET /metrics`` renders: the platform's own collector only (no per-process defaults,
    which would differ between API workers)."""
    from vbatch_pipelines.metrics import PlatformCollector, engines_with_stats
    from vbatch_pipelines.retention import disk_usage

    def dagster_queued() -> int | None:
        from dagster import DagsterRunStatus, RunsFilter

        from vbatch_pipelines.launch import DagsterUnreachable, dagster_instance

        try:
            return dagster_instance().get_runs_count(RunsFilter(statuses=[DagsterRunStatus.QUEUED]))
        except DagsterUnreachable:
            return None

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlatformCollector(db, services=services, dagster_queued=dagster_queued,
                                        engines=lambda: engines_with_stats(inference_engine),
                                        disk=(lambda: disk_usage(file_store)) if file_store is not None else None))
    return registry


def service_probes(settings: Settings, resources: dict) -> dict[str, BackgroundProbe | FixedState]:
    """The services a page or /health reports on, each checked in the background at most every 5 s."""
    probes = {"dagster": BackgroundProbe(http_check(f"{settings.dagster.url}/server_info"))}
    label_studio = resources.label_studio
    if label_studio.enabled:
        probes["label_studio"] = BackgroundProbe(http_check(
            f"{label_studio.url}/api/projects?page_size=1",
            headers=lambda: {"Authorization": f"Token {label_studio.api_token}"}))
    else:
        probes["label_studio"] = FixedState(f"off: {label_studio.disabled_reason}")
    return probes


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # What validating a batch's file needs (~0.8 s of imports), loaded before the first create needs it:
        # Parquet, and pandas, which pyarrow imports when it builds its first array (when installed).
        import pyarrow
        import pyarrow.parquet  # noqa: F401

        pyarrow.array([0])

        async def flush_usage():  # online usage, summed in memory, written every few seconds
            while True:
                await asyncio.sleep(USAGE_FLUSH_S)
                try:
                    await asyncio.to_thread(app.state.usage.flush, app.state.db)
                except Exception as exc:  # noqa: BLE001 - kept in memory, written next time
                    log.warning("could not write online usage (kept for the next try): %s", exc)

        flusher = asyncio.create_task(flush_usage())
        yield
        flusher.cancel()
        await asyncio.to_thread(app.state.usage.flush, app.state.db)
        app.state.batch_launcher.close()
        for hook in app.state.shutdown_hooks:
            hook()
        await app.state.engines.aclose()

    app = FastAPI(title="vbatch", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible batch and online inference on your own models.")
    extensions = enable(settings)  # VBATCH_EXTENSIONS (their review schemas registered in this process)
    # this process shows no config: secrets as they are
    resources = build_resources(settings, defer_secrets=False, extensions=extensions)
    app.state.settings = settings
    app.state.resources = resources
    app.state.db = resources.metadata_db.db
    app.state.engines = EnginePool(resources.inference_engine, resources.model_registry)
    app.state.batch_launcher = BatchLauncher(app.state.db, settings.dagster.url,
                                             warm=os.environ.get(WARM_AT_START_ENV) == "1")
    app.state.usage = OnlineUsage()
    app.state.token_budget = TokenBudget(app.state.db, app.state.usage)
    app.state.login_throttle = LoginThrottle()  # the console's failed logins, per client address
    app.state.review_listeners = []  # extensions' callbacks(resources, task_ids) after reviews are recorded
    app.state.shutdown_hooks = []  # extensions' callbacks when the app stops
    install_error_handlers(app)
    app.state.database_probe = DatabaseProbe(app.state.db)

    # Added last, runs first: the guard refuses drive-by requests before any body is read.
    app.add_middleware(BodyLimit, max_upload_bytes=settings.api.max_upload_bytes,
                       max_request_bytes=settings.api.max_request_bytes)
    app.add_middleware(KeyBeforeBody, required=lambda: keys_required(app.state),
                       caller_of=lambda token: caller_of(app.state.settings, app.state.db, token),
                       session_of=lambda token: caller_of_session(app.state.settings, app.state.db, token))
    app.add_middleware(DriveByGuard, allowed_hosts=settings.api.allowed_hosts,
                       enabled=lambda: not keys_required(app.state))
    app.add_middleware(NoFraming)

    for router in (files.router, batches.router, models.router, completions.router, curation.router,
                   fine_tuning.router, evals.router, organization.router):
        app.include_router(router, prefix="/v1", dependencies=[Depends(caller_role)], responses=ERRORS)
    app.include_router(completions.vllm_paths, dependencies=[Depends(caller_role)], responses=ERRORS)
    # Label Studio authenticates its webhooks with a shared secret header, not an API key.
    app.include_router(curation.webhooks, prefix="/v1")
    for extension in extensions:
        if extension.api is not None:
            extension.api(app)

    app.state.probes = service_probes(settings, resources)

    @app.get("/health", tags=["operations"], response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        """Liveness and readiness: the metadata DB must answer; Dagster or Label Studio being down is
        reported, not fatal (batches are recorded and launched by a sensor later; reviews wait)."""
        checks: dict = {"database": await app.state.database_probe.check(),
                        **{name: probe() for name, probe in app.state.probes.items()}, "services": services()}
        healthy = checks["database"] == "ok"
        return JSONResponse({"status": "ok" if healthy else "error", **checks}, status_code=200 if healthy else 503)

    registry = ProcessRegistry(resources.file_store.run_dir)
    services_seen: dict = {"at": 0.0, "report": {}}

    def services() -> dict:
        """The supervised services, re-read at most once a second (health checks poll often)."""
        now = time.time()
        if now - services_seen["at"] >= 1.0:
            report = {}
            for service in registry.services():
                running = service.is_running()
                report[service.name] = {"pid": service.pid, "port": service.port, "running": running,
                                        "restarts": service.restarts,
                                        "uptime_s": round(now - service.since, 1) if running else None}
            services_seen.update(at=now, report=report)
        return services_seen["report"]

    app.include_router(metrics.router, dependencies=[Depends(caller_role)], responses=ERRORS)
    console.install(app, extensions)
    app.state.metrics_registry = metrics_registry(app.state.db, services, resources.inference_engine,
                                                  resources.file_store)
    return app
