"""The inference engine as a Dagster resource: picks vLLM or the transformers fallback, opens engines.

``backend="auto"`` uses vLLM whenever a Python with vLLM is available (``VBATCH_VLLM_PYTHON``, the managed
env from ``vbatch engine install``, or this env) and falls back to transformers in-process otherwise.
"""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from vbatch_pipelines.engine.base import Engine
from vbatch_pipelines.engine.envs import find_vllm_python
from vbatch_pipelines.engine.vllm_server import ManagedVLLMServer, VLLMServerConfig
from vbatch_pipelines.models.registry import ModelSpec
from vbatch_pipelines.settings import load_settings

BACKENDS = ("auto", "vllm", "transformers")


class EngineNotAvailable(RuntimeError):
    pass


class InferenceEngine(ConfigurableResource):
    backend: str = Field(default="auto", description="auto | vllm | transformers")
    home: str = Field(description="VBATCH_HOME: managed servers keep their state under engines/")
    vllm_python: str | None = Field(default=None, description="Python with vLLM; default: discovered")
    gpus: int = 0
    max_concurrency: int = Field(default=512, description="requests in flight per batch")
    chunk_size: int = Field(default=64, description="requests per call to the engine (one HTTP call on vLLM)")
    request_timeout_s: float = 600.0
    startup_timeout_s: float = 600.0
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    extra_vllm_args: list[str] = Field(default_factory=list)

    def _vllm_python(self) -> str | None:
        return self.vllm_python or find_vllm_python(load_settings())

    def resolved_backend(self) -> str:
        if self.backend not in BACKENDS:
            raise ValueError(f"engine backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend != "auto":
            return self.backend
        return "vllm" if self._vllm_python() else "transformers"

    def server(self, model: ModelSpec) -> ManagedVLLMServer:
        python = self._vllm_python()
        if python is None:
            raise EngineNotAvailable(
                "vLLM is not installed: run `vbatch engine install`, set VBATCH_VLLM_PYTHON, or use "
                "VBATCH_ENGINE=transformers"
            )
        config = VLLMServerConfig(
            python=python, gpus=self.gpus, max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization, extra_args=list(self.extra_vllm_args),
            startup_timeout_s=self.startup_timeout_s,
        )
        return ManagedVLLMServer(model, Path(self.home) / "engines", config)

    def open(self, model: ModelSpec) -> Engine:
        """An engine serving ``model``, warm and ready; close it with ``await engine.aclose()``."""
        if self.resolved_backend() == "vllm":
            from vbatch_pipelines.engine.vllm_server import VLLMEngine

            return VLLMEngine(self.server(model), max_connections=self.max_concurrency,
                              timeout_s=self.request_timeout_s)
        from vbatch_pipelines.engine.transformers_engine import TransformersEngine

        return TransformersEngine(model)
