"""The inference engine as a Dagster resource: picks vLLM or the transformers fallback, opens engines.

``backend="auto"`` uses vLLM whenever a Python with vLLM is available (``VBATCH_VLLM_PYTHON``, the managed
env from ``vbatch engine install``, or this env) and falls back to transformers in-process otherwise.
Managed vLLM servers keep their state in the file store's ``engines/``; the model registry says which
fine-tunes each base server loads as adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import Field

from resources.config import config_of
from resources.file_store import FileStore
from resources.model_registry import ModelRegistry
from vbatch_pipelines.engine.base import Engine, EngineUnavailable
from vbatch_pipelines.engine.registry import UP, EngineRegistry
from vbatch_pipelines.engine.vllm_client import RemoteVLLMServer
from vbatch_pipelines.engine.vllm_env import find_vllm_python
from vbatch_pipelines.engine.vllm_server import (
    ManagedVLLMServer,
    VLLMServerConfig,
    managed_server_states,
    server_from_state,
)
from vbatch_pipelines.errors import Unavailable
from vbatch_pipelines.models.registry import EMBED, GENERATE, SCORE, ModelSpec
from vbatch_pipelines.settings import EngineSettings


class EngineNotAvailable(Unavailable):
    code = "engine_unavailable"


class InferenceEngine(config_of(EngineSettings)):
    """The engine settings (EngineSettings: backend, GPUs, context, KV cache, LoRA rank, external engines, this
    node) and what only code sets."""

    file_store: FileStore
    model_registry: ModelRegistry
    envs_dir: str = Field(description="where `vbatch engine install` builds vLLM's own virtualenv")
    max_concurrency: int = Field(default=512, description="requests in flight per batch")
    chunk_size: int = Field(default=64, description="requests per call to the engine (one HTTP call on vLLM)")
    request_timeout_s: float = 600.0
    startup_timeout_s: float = 600.0
    extra_vllm_args: list[str] = Field(default_factory=list)

    def _vllm_python(self) -> str | None:
        return find_vllm_python(self.vllm_python, Path(self.envs_dir), self.gpus)

    @property
    def engines_dir(self) -> Path:
        return self.file_store.engines_dir

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "vllm" if self._vllm_python() else "transformers"

    def server(self, model: ModelSpec) -> ManagedVLLMServer:
        """The managed vLLM server of ``model``'s base model (fine-tunes are adapters on it)."""
        python = self._vllm_python()
        if python is None:
            raise EngineNotAvailable(
                "vLLM is not installed: run `vbatch engine install`, set VBATCH_VLLM_PYTHON, or use "
                "VBATCH_ENGINE=transformers"
            )
        config = VLLMServerConfig(
            python=python, gpus=self.gpus, max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization, kv_cache_sequences=self.kv_cache_sequences,
            extra_args=list(self.extra_vllm_args),
            startup_timeout_s=self.startup_timeout_s, max_lora_rank=self.max_lora_rank, host=self.engine_host,
            tool_parser=self.tool_parsers.get(model.base.id), engine_slots=self.slots,
            adapter_roots=[str(self.file_store.fine_tunes_dir), str(self.file_store.models_dir)],
        )
        base = model.base
        return ManagedVLLMServer(base, self.engines_dir, config, adapters=lambda: self._deployed_adapters(base.id),
                                 registry=self.registry(), node=self.node)

    @property
    def slots(self) -> int:
        """Chunks an engine server runs at once, every batch's together (the rest wait their project's turn):
        VBATCH_ENGINE_SLOTS, or one batch's window (max_concurrency / chunk_size), so a batch alone runs as fast
        as ever and several share what one would have had."""
        return self.engine_slots or max(1, self.max_concurrency // max(1, self.chunk_size))

    def registry(self) -> EngineRegistry:
        return EngineRegistry(self.model_registry.metadata_db.db)

    def external_urls(self, base_id: str) -> list[str]:
        return list(self.external_engines.get(base_id, []))

    def replica_servers(self, model: ModelSpec) -> list[ManagedVLLMServer | RemoteVLLMServer]:
        """Every vLLM server of ``model``'s base model requests may go to. External engines when the model has
        some (vbatch starts none of its own then); otherwise this node's managed server, started on demand,
        and the managed servers other nodes registered as up."""
        base = model.base
        adapters = lambda: self._deployed_adapters(base.id)  # noqa: E731
        urls, registry = self.external_urls(base.id), self.registry()
        if urls:
            return [RemoteVLLMServer(base, url, adapters, registry, api_key=self.external_engines_api_key)
                    for url in urls]
        others = [RemoteVLLMServer(base, replica.base_url, adapters, registry, replica_id=replica.id,
                                   node=replica.node, kind="managed", api_key=replica.api_key)
                  for replica in registry.replicas(base.id, status=UP)
                  if replica.kind == "managed" and replica.node != self.node]
        return [self.server(model), *others]

    def _deployed_adapters(self, base_id: str) -> dict[str, str]:
        return {name: spec.adapter for name, spec in self.model_registry.fine_tuned_models(base_id).items()}

    def warm(self, model: ModelSpec) -> None:
        """Send a started engine one chunk of chat requests through the batch path, as a batch would: what the
        first batch would pay (the engine's first full chunk, its prefix cache, the middleware's first call) is
        paid now, before "vbatch is up". Pooling models need no warming beyond their start."""
        import asyncio

        if model.task != GENERATE:
            return
        bodies = [{"model": model.id, "max_tokens": 16, "temperature": 0,
                   "messages": [{"role": "user", "content": f"What is {k} plus {k % 7}?"}]}
                  for k in range(self.chunk_size)]

        async def chunk() -> None:
            engine = self.open(model)
            try:
                await engine.request_many("/v1/chat/completions", bodies)
            finally:
                await engine.aclose()

        asyncio.run(chunk())

    def open(self, model: ModelSpec) -> Engine:
        """An engine serving ``model``, warm and ready, over every replica that answers; close it with
        ``await engine.aclose()``."""
        if self.resolved_backend() == "vllm":
            from vbatch_pipelines.engine.replicated import ReplicatedEngine
            from vbatch_pipelines.engine.vllm_client import VLLMEngine

            def connect() -> list[VLLMEngine]:
                engines, failure = [], None
                for server in self.replica_servers(model):
                    try:
                        engines.append(VLLMEngine(server, model, max_connections=self.max_concurrency,
                                                  timeout_s=self.request_timeout_s))
                    except EngineUnavailable as exc:  # a replica not answering now, or this node's not starting
                        failure = exc
                if not engines:
                    raise failure or EngineUnavailable(f"no replica of {model.base.id} answers")
                return engines

            return ReplicatedEngine(model.id, connect)
        if model.task == EMBED:
            from vbatch_pipelines.engine.transformers_embeddings import TransformersEmbeddingEngine

            return TransformersEmbeddingEngine(model)
        if model.task == SCORE:
            from vbatch_pipelines.engine.transformers_embeddings import TransformersCrossEncoderEngine

            return TransformersCrossEncoderEngine(model)
        from vbatch_pipelines.engine.transformers_engine import TransformersEngine

        return TransformersEngine(model)

    def deploy_adapter(self, model: ModelSpec) -> None:
        """Make a fine-tune servable: on vLLM its adapter is loaded into every running replica of its base
        model (this node's started if needed) without a restart; a replica down now gets it when it is next
        used. The transformers engine loads it on first use."""
        if self.resolved_backend() != "vllm":
            return
        loaded, failure = 0, None
        for server in self.replica_servers(model):
            try:
                server.load_adapter(model.id, model.adapter)
                loaded += 1
            except EngineUnavailable as exc:
                failure = exc
        if not loaded:
            raise failure or EngineUnavailable(f"no replica of {model.base.id} answers")

    def undeploy_adapter(self, model: ModelSpec) -> bool:
        if self.resolved_backend() != "vllm":
            return False
        return any([server.unload_adapter(model.id) for server in self.replica_servers(model)])

    @contextmanager
    def released_for_training(self, log: Callable[[str], None] = print) -> Iterator[None]:
        """On a GPU, training and serving share it: running vLLM servers sleep (weights offloaded, KV cache
        freed) for the duration, or stop when sleep mode is unavailable, and come back after. On CPU the
        engine stays as it is."""
        if self.gpus == 0 or self.resolved_backend() != "vllm":
            yield
            return
        servers = [s for s in self.running_servers() if s.healthy()]
        asleep, stopped = [], []
        for server in servers:
            if server.lend_to_training():  # the loan is recorded: a run killed before `finally` loses nothing
                asleep.append(server)
            else:
                server.stop()
                stopped.append(server)
        if servers:
            log(f"Released the GPU for training: {len(asleep)} engine(s) asleep, {len(stopped)} stopped")
        try:
            yield
        finally:
            for server in asleep:
                if not server.take_back():
                    server.ensure()
            for server in stopped:
                server.ensure()
            if servers:
                log("Engines back after training")

    def running_servers(self) -> list[ManagedVLLMServer]:
        """The managed vLLM servers that have state files (one per base model that has served)."""
        found = []
        for spec, state in managed_server_states(self.engines_dir):
            try:
                found.append(self.server(spec))
            except EngineNotAvailable:  # started by a vLLM env no longer found: enough to stop it
                found.append(server_from_state(spec, self.engines_dir, state))
        return found
