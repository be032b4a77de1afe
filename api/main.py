"""The vbatch REST front door: OpenAI-compatible, small. It validates, records and launches Dagster
runs; Dagster does the work. Run with ``uvicorn --factory api.main:create_app`` (``vbatch up`` does)."""

from __future__ import annotations

from contextlib import asynccontextmanager

import httpx
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from api.deps import EnginePool, require_api_key
from api.errors import OpenAIError, install_error_handlers
from api.routers import batches, completions, files, models
from vbatch_pipelines.settings import Settings, load_settings
from vbatch_pipelines.store.db import get_database


class UploadLimit:
    """Refuse an oversized upload before its body is read (the store enforces the limit again while
    writing, for uploads without a Content-Length). Pure ASGI: no cost on other requests."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/files"):
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_bytes + 1024 * 1024:
                response = OpenAIError(413, f"File is larger than the limit of {self.max_bytes} bytes",
                                       param="file", code="file_too_large").response()
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await app.state.engines.aclose()

    app = FastAPI(title="vbatch", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible batch and online inference on your own models.")
    app.state.settings = settings
    app.state.db = get_database(settings.database_url)
    app.state.engines = EnginePool(settings)
    install_error_handlers(app)

    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)

    for router in (files.router, batches.router, models.router, completions.router):
        app.include_router(router, prefix="/v1", dependencies=[Depends(require_api_key)])

    @app.get("/health", tags=["operations"])
    def health() -> JSONResponse:
        checks = {"database": "ok", "dagster": "ok"}
        try:
            with app.state.db.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - report, don't raise
            checks["database"] = f"error: {exc}"
        try:
            httpx.get(f"{settings.dagster_url}/server_info", timeout=1).raise_for_status()
        except httpx.HTTPError as exc:
            checks["dagster"] = f"unreachable: {exc}"
        healthy = checks["database"] == "ok"
        return JSONResponse({"status": "ok" if healthy else "error", **checks}, status_code=200 if healthy else 503)

    return app
