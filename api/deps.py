"""Request dependencies: settings, the metadata DB, API keys, warm engines."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import Header, Request

from api.errors import OpenAIError
from vbatch_pipelines.engine.base import Engine
from vbatch_pipelines.models.registry import ModelNotFound, lookup_model, prepare_model
from vbatch_pipelines.settings import Settings
from vbatch_pipelines.store.db import Database


# Dependencies are async: FastAPI runs a sync one in its thread pool, a hand-off that costs more than
# the dependency itself.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> Database:
    return request.app.state.db


async def require_api_key(request: Request, authorization: str | None = Header(default=None)) -> None:
    """With VBATCH_API_KEYS set, every /v1 route needs ``Authorization: Bearer <key>``, as OpenAI's."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    if not authorization or not authorization.startswith("Bearer "):
        raise OpenAIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                          code="missing_api_key")
    token = authorization.removeprefix("Bearer ").strip()
    if not any(hmac.compare_digest(token, key) for key in keys):
        raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")


class EnginePool:
    """One warm engine per model for online requests (the same managed vLLM servers batches use)."""

    def __init__(self, settings: Settings):
        from vbatch_pipelines.definitions import build_resources

        self.settings = settings
        self.resource = build_resources(settings)["inference_engine"]
        self._engines: dict[str, Engine] = {}
        self._lock = asyncio.Lock()

    async def get(self, model_name: str | None) -> Engine:
        try:
            spec = lookup_model(self.settings, model_name)
        except ModelNotFound as exc:
            raise OpenAIError(404, str(exc), param="model", code="model_not_found") from exc
        async with self._lock:
            engine = self._engines.get(spec.id)
            if engine is None:
                await asyncio.to_thread(prepare_model, self.settings, spec)
                engine = await asyncio.to_thread(self.resource.open, spec)
                self._engines[spec.id] = engine
            return engine

    def forget(self, model_id: str) -> None:
        """Drop a removed model's engine (its connections close with it)."""
        engine = self._engines.pop(model_id, None)
        if engine is not None:
            asyncio.get_running_loop().create_task(engine.aclose())

    async def aclose(self) -> None:
        for engine in self._engines.values():
            await engine.aclose()
        self._engines.clear()


async def get_engines(request: Request) -> EnginePool:
    return request.app.state.engines
