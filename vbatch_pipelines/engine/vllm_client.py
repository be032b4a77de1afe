"""Talking to a vLLM OpenAI server, wherever it runs: the admin calls vbatch makes of any server of a base model
(is it serving, its LoRA adapters loaded and unloaded: ``VLLMServerAPI``), a server running elsewhere
(``RemoteVLLMServer``), and the client every batch and online request goes through (``VLLMEngine``). Starting
and keeping a server of vbatch's own is ``vllm_server``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx

from vbatch_pipelines.engine import vllm_batch_middleware as BATCH_MIDDLEWARE
from vbatch_pipelines.engine.base import EngineResponse, EngineUnavailable, Share
from vbatch_pipelines.engine.registry import DOWN, UP, EngineRegistry, external_id
from vbatch_pipelines.models.registry import ModelSpec
from vbatch_pipelines.net import local_http

log = logging.getLogger("vbatch.engine")


class AdapterLoadError(RuntimeError):
    pass


class VLLMServerAPI:
    """What vbatch asks of any vLLM server of one base model over HTTP, wherever it runs: is it serving the
    model, which LoRA adapters it has loaded, load and unload one."""

    model: ModelSpec
    adapters: Callable[[], dict[str, str]]  # the deployed fine-tunes (name -> adapter dir)

    def auth_headers(self) -> dict[str, str]:
        """What every request to the server carries: its key (none for a server that takes none)."""
        raise NotImplementedError

    def probe(self, url: str, timeout: float) -> bool:
        try:
            if local_http().get(f"{url}/health", timeout=timeout).status_code != 200:
                return False
            served = local_http().get(f"{url}/v1/models", headers=self.auth_headers(), timeout=timeout).json()
            return any(m.get("id") == self.model.id for m in served.get("data", []))
        except (httpx.HTTPError, ValueError):
            return False

    def loaded_models(self, url: str) -> list[str]:
        return [m["id"] for m in local_http().get(f"{url}/v1/models", headers=self.auth_headers(),
                                                  timeout=10).json().get("data", [])]

    def load_adapter_at(self, url: str, name: str, path: str) -> None:
        if name in self.loaded_models(url):
            return
        response = local_http().post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                                     headers=self.auth_headers(), timeout=300)
        if response.status_code != 200 and "already been loaded" not in response.text:
            raise AdapterLoadError(f"vLLM refused to load the adapter {name} from {path}: "
                                   f"{response.status_code} {response.text[:500]}")

    def unload_adapter_at(self, url: str, name: str) -> bool:
        if name not in self.loaded_models(url):
            return False
        response = local_http().post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name},
                                     headers=self.auth_headers(), timeout=60)
        if response.status_code != 200:
            raise AdapterLoadError(f"vLLM refused to unload {name}: {response.status_code} {response.text[:500]}")
        return True

    def restore_adapters(self, url: str) -> list[str]:
        """Load every deployed fine-tune the server lacks (it restarted since they were deployed); returns
        what it serves now."""
        loaded = self.loaded_models(url)
        for name, path in self.adapters().items():
            if name not in loaded:
                self.load_adapter_at(url, name, path)
                loaded.append(name)
        return loaded


class RemoteVLLMServer(VLLMServerAPI):
    """A vLLM server of one base model that vbatch did not start here: an external engine (VBATCH_ENGINES), or
    a managed one on another node. It is used while it answers; restarting it is its owner's job (its node's
    worker, its Kubernetes Deployment). Deployed fine-tunes it lost in a restart are loaded back when it is
    next used. Adapter paths must be readable by it (the shared store)."""

    def __init__(self, model: ModelSpec, url: str, adapters: Callable[[], dict[str, str]] = dict,
                 registry: EngineRegistry | None = None, *, replica_id: str | None = None, node: str = "external",
                 kind: str = "external", probe_timeout_s: float = 5.0, api_key: str | None = None):
        self.model, self.url, self.adapters = model, url.rstrip("/"), adapters
        self._api_key = api_key  # another node's managed engine's (the registry's); an external one takes none
        self.registry, self.node, self.kind = registry, node, kind
        self.replica_id = replica_id or external_id(model.id, self.url)
        self.probe_timeout_s = probe_timeout_s

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def healthy(self) -> bool:
        return self.probe(self.url, self.probe_timeout_s)

    def ensure(self) -> str:
        """Its URL once it answers and serves every deployed fine-tune; EngineUnavailable otherwise."""
        try:
            if not self.healthy():
                raise EngineUnavailable(f"vLLM server for {self.model.id} at {self.url} does not answer")
            loaded = self.restore_adapters(self.url)
        except (EngineUnavailable, AdapterLoadError, httpx.HTTPError, ValueError) as exc:
            self.seen_down(str(exc))
            raise EngineUnavailable(str(exc)) from exc
        if self.registry is not None:
            self.registry.record(id=self.replica_id, model=self.model.id, base_url=self.url, node=self.node,
                                 kind=self.kind, status=UP, adapters=[m for m in loaded if m != self.model.id])
        return self.url

    def load_adapter(self, name: str, path: str) -> None:
        self.load_adapter_at(self.ensure(), name, path)

    def unload_adapter(self, name: str) -> bool:
        return self.healthy() and self.unload_adapter_at(self.url, name)

    def stop(self) -> bool:
        return False  # not ours to stop

    def seen_down(self, error: str) -> None:
        if self.registry is not None:
            self.registry.record(id=self.replica_id, model=self.model.id, base_url=self.url, node=self.node,
                                 kind=self.kind, status=DOWN, error=error)


# Where vLLM serves an endpoint when not at its own path: its /v1/score and /v1/rerank log a deprecation
# warning on every call.
VLLM_PATHS = {"/v1/score": "/score", "/v1/rerank": "/rerank"}


class VLLMEngine:
    """Streams OpenAI requests to one vLLM server of the model (managed here or remote) over HTTP."""

    backend = "vllm"

    def __init__(self, server: VLLMServerAPI, model: ModelSpec, max_connections: int = 256,
                 timeout_s: float = 600.0):
        self.server = server
        self.model = model  # the base model, or a fine-tune served as an adapter on it
        self.model_id = model.id
        self._max_connections = max_connections
        self._timeout_s = timeout_s
        self._url = self._ensure()
        self._session = None

    @property
    def url(self) -> str:
        return self._url

    def _ensure(self) -> str:
        url = self.server.ensure()
        if self.model.adapter:
            self.server.load_adapter(self.model.id, self.model.adapter)
        return url

    def _client(self):
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections), headers=self.server.auth_headers(),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                json_serialize=lambda obj: json.dumps(obj, separators=(",", ":")),
            )
        return self._session

    async def _post(self, path: str, payload: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
        import aiohttp

        try:
            async with self._client().post(self._url + path, json=payload, headers=headers) as response:
                return response.status, await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise EngineUnavailable(f"vLLM server for {self.model_id} did not answer: {exc!r}") from exc

    async def request(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        status, payload = await self._post(VLLM_PATHS.get(endpoint, endpoint), body)
        if status >= 500:
            raise EngineUnavailable(f"vLLM server for {self.model_id} answered {status}: {payload}")
        return EngineResponse(status, payload if status == 200 else _openai_error(payload, status))

    async def request_many(self, endpoint: str, bodies: list[dict[str, Any]],
                           share: Share | None = None) -> list[EngineResponse]:
        """The bodies as one chunk; ``share`` (project, weight) is whose it is in the server's fair share."""
        headers = {BATCH_MIDDLEWARE.PROJECT_HEADER: share[0], BATCH_MIDDLEWARE.WEIGHT_HEADER: str(share[1])} \
            if share else None
        status, payload = await self._post(BATCH_MIDDLEWARE.ROUTE, {"endpoint": endpoint, "requests": bodies},
                                           headers)
        if status != 200:
            raise EngineUnavailable(f"vLLM server for {self.model_id} answered {status}: {payload}")
        return [EngineResponse(r["status_code"], r["body"] if r["status_code"] == 200
                               else _openai_error(r["body"], r["status_code"]))
                for r in payload["results"]]

    async def open_stream(self, endpoint: str, body: dict[str, Any]):
        import aiohttp

        try:
            response = await self._client().post(self._url + endpoint, json=body)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EngineUnavailable(f"vLLM server for {self.model_id} did not answer: {exc!r}") from exc
        if response.status != 200:
            async with response:
                payload = await response.json(content_type=None)
            if response.status >= 500:
                raise EngineUnavailable(f"vLLM server for {self.model_id} answered {response.status}: {payload}")
            return EngineResponse(response.status, _openai_error(payload, response.status))

        async def events():
            async with response:
                async for chunk in response.content.iter_any():
                    yield chunk

        return events()

    async def recover(self) -> None:
        import asyncio

        if self._session is not None:
            await self._session.close()
            self._session = None
        forget = getattr(self.server, "forget_healthy", None)
        if forget is not None:  # a request failed: ask the server again, not the last answer it gave
            forget()
        self._url = await asyncio.to_thread(self._ensure)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _openai_error(payload: Any, status: int) -> dict[str, Any]:
    """vLLM's error bodies, normalised to OpenAI's ``{"error": {message, type, param, code}}``."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        error = {"message": str(payload)}
    return {"error": {
        "message": str(error.get("message", "")),
        "type": "invalid_request_error" if status < 500 else "server_error",
        "param": error.get("param"),
        "code": None if isinstance(error.get("code"), int) else error.get("code"),
    }}
