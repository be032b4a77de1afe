"""Request dependencies: settings, the metadata DB, the resources (built once per app from the settings, as
the code location builds them), API keys, warm engines."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import Header, Request

from api.errors import OpenAIError
from resources import FileStore, InferenceEngine, LabelStudio, ModelRegistry, Trainer
from vbatch_pipelines.engine.base import Engine
from vbatch_pipelines.settings import Settings
from vbatch_pipelines.store.db import Database


# Dependencies are async: FastAPI runs a sync one in its thread pool, a hand-off that costs more than
# the dependency itself.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> Database:
    return request.app.state.db


async def get_file_store(request: Request) -> FileStore:
    return request.app.state.resources["file_store"]


async def get_model_registry(request: Request) -> ModelRegistry:
    return request.app.state.resources["model_registry"]


async def get_trainer(request: Request) -> Trainer:
    return request.app.state.resources["trainer"]


async def get_label_studio_resource(request: Request) -> LabelStudio:
    return request.app.state.resources["label_studio"]


async def get_label_studio(request: Request) -> LabelStudio:
    """The Label Studio resource, for routes that need it; 409 when curation is off or it is not installed."""
    label_studio = await get_label_studio_resource(request)
    if not label_studio.enabled:
        raise OpenAIError(409, f"Curation is unavailable: {label_studio.disabled_reason}", code="curation_disabled")
    return label_studio


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of a credential a client sent with ours; any text (also non-ASCII) is
    compared as UTF-8 bytes, so a strange header is a mismatch, never an error."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


async def require_api_key(request: Request, authorization: str | None = Header(default=None)) -> None:
    """With VBATCH_API_KEYS set, every /v1 route needs ``Authorization: Bearer <key>``, as OpenAI's."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    if not authorization or not authorization.startswith("Bearer "):
        raise OpenAIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                          code="missing_api_key")
    token = authorization.removeprefix("Bearer ").strip()
    if not any(same_secret(token, key) for key in keys):
        raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")


class EnginePool:
    """One warm engine per model for online requests (the same managed vLLM servers batches use)."""

    def __init__(self, inference_engine: InferenceEngine, model_registry: ModelRegistry):
        self.resource = inference_engine
        self.registry = model_registry
        self._engines: dict[str, Engine] = {}
        self._lock = asyncio.Lock()

    async def get(self, model_name: str | None) -> Engine:
        spec = self.registry.lookup(model_name)  # ModelNotFound: a 404 naming the served models
        async with self._lock:
            engine = self._engines.get(spec.id)
            if engine is None:
                await asyncio.to_thread(self.registry.prepare, spec)
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
