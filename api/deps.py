"""Request dependencies: settings, the metadata DB, the resources (built once per app from the settings, as
the code location builds them), API keys, warm engines."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Literal

from fastapi import Depends, Header, Request

from api.errors import OpenAIError
from api.guard import AUTHENTICATED
from resources import FileStore, InferenceEngine, LabelStudio, ModelRegistry, Trainer
from vbatch_pipelines.engine.base import Engine
from vbatch_pipelines.fine_tuning.training_data import model_max_length
from vbatch_pipelines.launch import BatchLauncher
from vbatch_pipelines.projects import (
    DEFAULT_PROJECT,
    OPERATOR,
    Caller,
    any_keys,
    audit,
    caller_of_key,
    caller_of_key_hash,
    secret_hash,
    session_key_hash,
)
from vbatch_pipelines.settings import Settings
from vbatch_pipelines.store.db import Database

log = logging.getLogger("vbatch.api")

# Dependencies are async: FastAPI runs a sync one in its thread pool, a hand-off that costs more than
# the dependency itself.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> Database:
    return request.app.state.db


async def get_batch_launcher(request: Request) -> BatchLauncher:
    return request.app.state.batch_launcher


async def get_file_store(request: Request) -> FileStore:
    return request.app.state.resources.file_store


async def get_model_registry(request: Request) -> ModelRegistry:
    return request.app.state.resources.model_registry


async def get_trainer(request: Request) -> Trainer:
    return request.app.state.resources.trainer


async def get_label_studio_resource(request: Request) -> LabelStudio:
    return request.app.state.resources.label_studio


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


Role = Literal["use", "admin"]


async def caller_role(request: Request, authorization: str | None = Header(default=None)) -> Role:
    """Who is calling, from ``Authorization: Bearer <key>`` as OpenAI's API takes it: a key in
    VBATCH_ADMIN_KEYS is a platform admin, one in VBATCH_API_KEYS a member of the default project, a project key
    (``vbatch keys create``, the organization API) a member or admin of its project, looked up on every request
    (a revoked key fails its next one). With no key anywhere the API answers only on loopback (and the guard in
    api/guard.py) and its one user is the operator: an admin. The caller is kept on ``request.state.caller``."""
    settings, db = request.app.state.settings, request.app.state.db
    token = authorization.removeprefix("Bearer ").strip() if authorization and \
        authorization.startswith("Bearer ") else None
    if not keys_required(request.app.state):
        request.state.caller = OPERATOR
        return OPERATOR.role
    checked = getattr(request.state, AUTHENTICATED, None)  # KeyBeforeBody's: the key was looked up already
    if checked is not None:
        request.state.caller = checked
        return checked.role
    if token is None:
        raise OpenAIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                          code="missing_api_key")
    caller = await asyncio.to_thread(caller_of, settings, db, token)
    if caller is None:
        log.warning("refused an API request to %s %s: invalid API key", request.method, request.url.path)
        raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
    request.state.caller = caller
    return caller.role


KEYS_CHECK_S = 1.0  # while no key exists, whether one was made (by the CLI, another API process) is asked this often


KEYS_WAIT_S = 0.15  # how long a request waits for the keys check; a database slower than that: keys required


def keys_required(state) -> bool:
    """Whether a request needs a key (the API's and the console's one rule): when the settings name keys, or a
    project key was ever made. Once one was, it stays so (no more asking); before, the answer is asked anew every
    KEYS_CHECK_S by a thread (one at a time), waited for KEYS_WAIT_S at most: a stalled database never holds the
    event loop, and while the answer is not known a key is required (never open by default)."""
    import threading

    settings = state.settings
    if settings.api.keys or settings.api.admin_keys or getattr(state, "keys_made", False):
        return True
    if time.monotonic() - getattr(state, "keys_checked_at", -KEYS_CHECK_S) >= KEYS_CHECK_S:
        pending = getattr(state, "keys_check", None)
        if pending is None or not pending.is_alive():
            pending = state.keys_check = threading.Thread(target=check_keys, args=(state,), daemon=True,
                                                          name="vbatch-keys-check")
            pending.start()
            pending.join(KEYS_WAIT_S)
        if pending.is_alive():
            return True
    return not getattr(state, "keys_known", False) or state.keys_made


def check_keys(state) -> None:
    """Whether any project key exists now (one indexed row at most), into ``state.keys_made``; unknown (keys
    required) when the database does not answer."""
    try:
        state.keys_made = getattr(state, "keys_made", False) or any_keys(state.db)
        state.keys_known = True
    except Exception as exc:  # noqa: BLE001 - unknown: keys required until the database answers
        state.keys_known = False
        log.warning("could not ask the metadata DB whether API keys exist: %s", type(exc).__name__)
    finally:
        state.keys_checked_at = time.monotonic()


def record(request: Request, type: str, target: str, **details) -> None:
    """The audit log's entry for what this request's caller just did."""
    audit(request.app.state.db, request.state.caller, type, target, **details)


async def get_caller(request: Request, role: Role = Depends(caller_role)) -> Caller:
    return request.state.caller


def caller_of(settings, db: Database, token: str) -> Caller | None:
    """The caller a key makes (the API's bearer key, the console's login), None for an unknown or revoked one."""
    role = role_of_key(settings, token)
    if role is not None:
        return _settings_caller(role)
    return caller_of_key(db, token)


def caller_of_session(settings, db: Database, token: str) -> Caller | None:
    """The caller behind a console session's token: the key it was opened with, as that key stands now (revoked,
    or gone from the settings: no caller); None for an unknown, ended or expired session."""
    key_hash = session_key_hash(db, token)
    if key_hash is None:
        return None
    role = role_of_key_hash(settings, key_hash)
    return _settings_caller(role) if role is not None else caller_of_key_hash(db, key_hash)


def _settings_caller(role: Role) -> Caller:
    return Caller(DEFAULT_PROJECT, "admin" if role == "admin" else "member", role == "admin", None,
                  "VBATCH_ADMIN_KEYS" if role == "admin" else "VBATCH_API_KEYS")


def role_of_key(settings, token: str) -> Role | None:
    """The role a key of the settings gives, None for a key not in them."""
    return role_of_key_hash(settings, secret_hash(token))


def role_of_key_hash(settings, key_hash: str) -> Role | None:
    """``role_of_key`` by the key's hash."""
    # Every key is compared (no early exit), so the time taken says nothing of which list matched.
    admin = [same_secret(key_hash, secret_hash(key)) for key in settings.api.admin_keys]
    use = [same_secret(key_hash, secret_hash(key)) for key in settings.api.keys]
    if any(admin):
        return "admin"
    if any(use):
        return "use"
    return None


async def require_admin(role: Role = Depends(caller_role)) -> None:
    """For what can touch the host: installing and deleting base models, local sources, remote code."""
    if role != "admin":
        raise OpenAIError(403, "This needs an admin key (VBATCH_ADMIN_KEYS); yours is a use key",
                          code="admin_key_required")


class EnginePool:
    """One warm engine per model for online requests (the same managed vLLM servers batches use)."""

    def __init__(self, inference_engine: InferenceEngine, model_registry: ModelRegistry):
        self.resource = inference_engine
        self.registry = model_registry
        self._engines: dict[str, Engine] = {}
        self._contexts: dict[str, int | None] = {}
        self._lock = asyncio.Lock()

    async def get(self, model_name: str | None, endpoint: str, project_id: str) -> Engine:
        """The warm engine of the model a request of ``project_id`` names (for ``endpoint``: its default model,
        and a 400 when the model cannot serve it); ModelNotFound is a 404 naming the models it may use (another
        project's fine-tune is one it may not)."""
        spec = await asyncio.to_thread(self.registry.for_endpoint, model_name, endpoint, project_id)
        async with self._lock:
            engine = self._engines.get(spec.id)
            if engine is None:
                await asyncio.to_thread(self.registry.prepare, spec)
                engine = await asyncio.to_thread(self.resource.open, spec)
                self._engines[spec.id] = engine
            return engine

    def context_length(self, spec) -> int | None:
        """The longest sequence the model's engine takes: config.json's max_position_embeddings, or the
        engine's VBATCH_MAX_MODEL_LEN when shorter. None when the model's config does not say."""
        if spec.path not in self._contexts:
            self._contexts[spec.path] = model_max_length(spec.path)
        own = self._contexts[spec.path]
        limits = [n for n in (own, self.resource.max_model_len) if n]
        return min(limits) if limits else None

    async def check_length(self, model_name: str | None, max_new_tokens: int, endpoint: str, param: str,
                           project_id: str) -> None:
        """Refuse, before any engine starts, what the model can never produce (or a model that does not
        generate); ``param`` is the request's field that asked for ``max_new_tokens``."""
        spec = await asyncio.to_thread(self.registry.for_endpoint, model_name, endpoint, project_id)
        context = self.context_length(spec)
        if context is not None and max_new_tokens >= context:
            raise OpenAIError(400, f"{param} is {max_new_tokens}, but {spec.id}'s context length is {context} "
                                   "tokens, prompt included", param=param, code="context_length_exceeded")

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
