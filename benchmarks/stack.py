"""What the end-to-end benchmarks share: a real `vbatch up` on a temporary home (or cluster mode: `vbatch up
--mode cluster` and a `vbatch worker`), request files, waiting for batches through the openai SDK, and the peak
memory of the platform's processes.

Every end-to-end figure goes through the path a user takes: the openai SDK -> the API -> a Dagster run on
the daemon's run worker (in cluster mode: a node's Celery worker) -> the warm engine.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import psutil

from vbatch_pipelines.net import free_port, local_http

ROOT = Path(__file__).resolve().parents[1]
ENDED = ("completed", "failed", "cancelled", "expired")


def requests_jsonl(n: int, prefix: str, max_tokens: int = 16) -> bytes:
    """``n`` chat requests, every body different (identical greedy ones would be answered once: batch.schedule)."""
    return "".join(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "vbatch-tiny-chat", "max_tokens": max_tokens, "temperature": 0,
                                        "messages": [{"role": "user", "content": f"What is {i % 97} plus {i // 97}?"}]}})
                   + "\n" for i in range(n)).encode()


def prefix_cache_counts(metrics_url: str) -> tuple[float, float]:
    """(hits, queries) in prompt tokens so far, from a vLLM engine's Prometheus ``metrics_url``."""
    text = local_http().get(metrics_url, timeout=10).text
    counts = {"hits": 0.0, "queries": 0.0}
    for metric_line in text.splitlines():
        for kind in counts:
            if metric_line.startswith(f"vllm:prefix_cache_{kind}_total"):
                counts[kind] += float(metric_line.rsplit(" ", 1)[1])
    return counts["hits"], counts["queries"]


def run_batch(python: str, model_path: str, source: Path, out: Path, engine_args: list[str],
              served_model: str = "vbatch-tiny-chat", cache: list | None = None) -> tuple[float, float]:
    """`vllm run-batch` on ``source``: (wall seconds, processing seconds). Processing runs from its "Reading
    batch from" log line (engine loaded) to its output file being written, so its start-up is not counted
    against it. With ``cache`` (a list), run-batch serves its metrics and the last (hits, queries) of its prefix
    cache read while it ran is appended (read every 0.2 s: the last moments' requests may be missing)."""
    argv = [python, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(source), "-o", str(out),
            "--model", model_path, "--served-model-name", served_model, *engine_args]
    stop = threading.Event()
    last: list[tuple[float, float]] = []
    if cache is not None:
        port = free_port()
        argv += ["--enable-metrics", "--host", "127.0.0.1", "--port", str(port)]

        def watch() -> None:
            while not stop.wait(0.2):
                try:
                    last[:] = [prefix_cache_counts(f"http://127.0.0.1:{port}/metrics")]
                except (OSError, httpx.HTTPError):
                    pass  # not serving yet, or gone

        threading.Thread(target=watch, daemon=True).start()
    out.unlink(missing_ok=True)
    started = time.time()
    reading_at = None
    # Its own process group: run-batch's engine core and worker outlive it when it alone is killed (one left
    # behind held a core for the next 20 minutes), so an interrupted benchmark kills the whole group.
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    tail: list[str] = []
    try:
        for line in process.stdout:
            tail = (tail + [line])[-40:]
            if reading_at is None and "Reading batch from" in line:
                reading_at = time.time()
        process.wait()
    finally:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # it, if interrupted, and whatever it left running
    if process.wait() != 0 or reading_at is None:
        raise RuntimeError(f"run-batch failed (exit {process.returncode}):\n{''.join(tail)}")
    wall = time.time() - started
    with open(out) as written, open(source) as given:
        assert sum(1 for _ in written) == sum(1 for _ in given), "run-batch lost requests"
    if cache is not None:
        cache.append(last[0] if last else (0.0, 0.0))
    return wall, out.stat().st_mtime - reading_at


def worktree(rev: str) -> Path:
    """A checkout of git revision ``rev`` (made once, beside the others): a peer's code, run side by side."""
    path = Path(tempfile.gettempdir()) / f"vbatch-peer-{rev}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                       capture_output=True)
    return path


def alternate(trials: int, sides: list[Callable[[], object]]) -> Iterator[int]:
    """Run every side once per trial, each first in turn (so the machine's drift hits all sides alike);
    yields each trial's index after it ran. Compare the medians."""
    for trial in range(trials):
        for side in sides if trial % 2 == 0 else reversed(sides):
            side()
        yield trial


def load_average() -> str:
    """The 1/5/15-minute load averages: the machine is shared, so figures come with the load they ran under."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


class Stack:
    """`vbatch up` (curation off unless asked) on a fresh home; ``client`` is an openai SDK client.

    With ``cluster`` (VBATCH_DATABASE_URL, VBATCH_DAGSTER_DATABASE_URL and VBATCH_BROKER_URL: PostgreSQL and
    Redis, see tests/postgres_server.py and tests/redis_server.py): `vbatch up --mode cluster` and one `vbatch
    worker` node (no GPU) with a home of its own under this one, sharing the store ``home/store``."""

    def __init__(self, home: Path | None = None, *, curation: bool = False, env: dict[str, str] | None = None,
                 cluster: dict[str, str] | None = None, root: Path = ROOT):
        self._own_home = home is None  # a home made here is removed by stop()
        self.home = home or Path(tempfile.mkdtemp(prefix="vbatch-bench-"))
        api_port, dagster_port = free_port(), free_port()
        full_env = dict(os.environ, VBATCH_HOME=str(self.home), DAGSTER_HOME=str(self.home / "dagster"),
                        VBATCH_CURATION="on" if curation else "off", **(env or {}))
        mode = []
        if cluster:
            full_env.update(cluster, VBATCH_STORE=str(self.home / "store"),
                            VBATCH_DAGSTER_URL=f"http://127.0.0.1:{dagster_port}")
            mode = ["--mode", "cluster"]
        self.root = root  # whose code runs: this checkout, or a peer revision's (``worktree``)
        self.env = full_env
        self.process: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.process = self._start(["up", "--api-port", str(api_port), "--dagster-port", str(dagster_port), *mode],
                                   full_env, "Ctrl-C stops everything")
        if cluster:
            node = self.home / "node"
            self.worker = self._start(["worker", "--node", "bench", "--gpus", "0"],
                                      {**full_env, "VBATCH_HOME": str(node), "DAGSTER_HOME": str(node / "dagster")},
                                      "Ctrl-C stops it.")
        self.api = f"http://127.0.0.1:{api_port}"
        self.client = openai.OpenAI(base_url=self.api + "/v1", api_key="bench", max_retries=0)

    def _start(self, command: list[str], env: dict[str, str], ready: str) -> subprocess.Popen:
        """A vbatch command, once it printed ``ready`` (its banner's last line)."""
        process = subprocess.Popen([sys.executable, "-m", "vbatch_pipelines.cli", *command], env=env, cwd=self.root,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in process.stdout:
            seen.append(line)
            if ready in line:
                break
        if process.poll() is not None:
            if self.process is not None:
                self.stop()
            raise RuntimeError(f"vbatch {command[0]} failed:\n{''.join(seen)[-3000:]}")
        threading.Thread(target=process.stdout.read, daemon=True).start()  # keep its pipe drained
        return process

    def upload(self, data: bytes, name: str = "input.jsonl", client: openai.OpenAI | None = None) -> str:
        return (client or self.client).files.create(file=(name, io.BytesIO(data)), purpose="batch").id

    def create(self, file_id: str, client: openai.OpenAI | None = None, endpoint: str = "/v1/chat/completions") -> str:
        return (client or self.client).batches.create(input_file_id=file_id, endpoint=endpoint,
                                                      completion_window="24h").id

    def wait(self, batch_id: str, timeout: float = 3600, interval: float = 0.02,
             client: openai.OpenAI | None = None):
        """Poll every ``interval`` s, or every 0.5 % of the time waited so far when that is longer: the end is
        seen as precisely, but a batch of minutes is not polled 50 times a second (on 2 cores the polls, the
        API answering them included, took a tenth of a core from the engine)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            batch = (client or self.client).batches.retrieve(batch_id)
            if batch.status in ENDED:
                return batch
            time.sleep(max(interval, 0.005 * (time.monotonic() - started)))
        raise TimeoutError(batch_id)

    def wait_all(self, batch_ids: list[str], timeout: float = 3600, interval: float = 0.05) -> dict[str, tuple]:
        """Watch many batches as a dashboard does, one list call a round (not a poller per batch, whose
        requests would take the CPU the platform needs); returns {id: (seconds until seen ended, batch)}."""
        started, pending, ended = time.monotonic(), set(batch_ids), {}
        while pending and time.monotonic() - started < timeout:
            unseen = set(pending)
            for batch in self.client.batches.list(limit=100):  # newest first: stops once ours are all seen
                unseen.discard(batch.id)
                if batch.id in pending and batch.status in ENDED:
                    ended[batch.id] = (time.monotonic() - started, batch)
                    pending.discard(batch.id)
                if not unseen:
                    break
            time.sleep(interval)
        if pending:
            raise TimeoutError(sorted(pending)[:3])
        return ended

    def run(self, data: bytes) -> tuple[float, object]:
        """Upload (not timed), then create -> completed; returns (seconds, batch)."""
        file_id = self.upload(data)
        started = time.monotonic()
        batch = self.wait(self.create(file_id))
        return time.monotonic() - started, batch

    def timed(self, source: Path, endpoint: str = "/v1/chat/completions") -> tuple[float, float, object]:
        """``source`` through the API as a user sends it: (create -> completed seconds, upload seconds, batch);
        asserts every request completed."""
        started = time.monotonic()
        file_id = self.upload(source.read_bytes(), source.name)
        uploaded = time.monotonic()
        batch = self.wait(self.create(file_id, endpoint=endpoint))
        done = time.monotonic()
        assert batch.status == "completed" and batch.request_counts.completed == batch.request_counts.total, batch
        return done - uploaded, uploaded - started, batch

    def engine(self, model: str | None = None) -> tuple[object, list[str], str]:
        """(model spec, engine flags, vLLM's python) of the engine this stack serves ``model`` on (None: the
        default), from the platform's own resources: what run-batch is given for a like-for-like comparison."""
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            from resources.factory import build_resources
            from vbatch_pipelines.settings import load_settings

            resources = build_resources(load_settings(), defer_secrets=False)
            spec = resources.model_registry.resolve(model)
            server = resources.inference_engine.server(spec)
            return spec, server.engine_args(), server.config.python
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def output_ids(self, batch) -> list[str]:
        if not batch.output_file_id:
            return []
        return [json.loads(line)["custom_id"] for line in
                self.client.files.content(batch.output_file_id).text.splitlines()]

    def services(self) -> dict[str, int]:
        record = json.loads((self.home / "run" / "services.json").read_text())
        return {name: entry["pid"] for name, entry in record["services"].items()}

    def stop(self) -> None:
        processes = [process for process in (self.worker, self.process) if process is not None]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=120)
        if self._own_home:
            shutil.rmtree(self.home, ignore_errors=True)


class _Sampler:
    """Samples something in a thread for the duration of a ``with`` block."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        raise NotImplementedError


class PeakMemory(_Sampler):
    """Peak RSS of the API (its largest process), the Dagster daemon and each run worker, sampled in a thread.
    Run workers are the processes running ``vbatch_pipelines.dagster_ext.run_launcher`` under the webserver (runs the API
    launches) or the daemon (runs its sensors and retries launch). vLLM is not counted."""

    def __init__(self, stack: Stack, every_s: float = 0.2):
        super().__init__(every_s)
        self.stack = stack
        self.peak: dict[str, int] = {"api": 0, "daemon": 0, "run worker": 0}

    def _rss(self, process: psutil.Process) -> int:
        try:
            return process.memory_info().rss
        except psutil.Error:
            return 0

    def _sample(self) -> None:
        pids = self.stack.services()
        api, daemon = psutil.Process(pids["api"]), psutil.Process(pids["dagster-daemon"])
        launchers = [daemon, psutil.Process(pids["dagster-webserver"])]
        while not self._stop.is_set():
            try:
                api_children = api.children(recursive=True)
                workers = [p for launcher in launchers for p in launcher.children(recursive=True)
                           if "vbatch_pipelines.dagster_ext.run_launcher" in " ".join(p.cmdline())]
            except psutil.Error:
                api_children, workers = [], []
            # uvicorn's workers each hold a copy: the API's figure is its largest process
            self.peak["api"] = max(self.peak["api"], *(self._rss(p) for p in [api, *api_children]))
            self.peak["daemon"] = max(self.peak["daemon"], self._rss(daemon))
            self.peak["run worker"] = max(self.peak["run worker"], *(self._rss(p) for p in workers), 0)
            self._stop.wait(self.every_s)

    def summary(self) -> str:
        return ", ".join(f"{name} {value / 2**20:.0f} MB" for name, value in self.peak.items())


def engine_pid(stack: Stack) -> int:
    """The process of the vLLM server ``stack`` started (its state file's)."""
    states = [json.loads(p.read_text()) for p in (stack.home / "engines").glob("*.json")]
    return next(s["pid"] for s in states if s.get("model"))


def cpu_seconds(processes) -> float:
    """User and system CPU seconds of ``processes`` so far, with their children that ended and were reaped (a
    run worker that exits meanwhile still counts, in its parent's)."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.Error:
            pass
    return total


class EngineBusy(_Sampler):
    """The fraction of time the engine was working: its processes (the vLLM server and its engine core)
    sampled every 0.1 s, busy when together they used more than half a core."""

    def __init__(self, stack: Stack | None = None, every_s: float = 0.1, *, pid: int | None = None):
        """The engine ``stack`` started, or the server whose process is ``pid`` (a replica elsewhere)."""
        super().__init__(every_s)
        self.root = psutil.Process(pid if pid is not None else engine_pid(stack))
        self.samples: list[bool] = []

    def _cpu(self) -> float:
        return cpu_seconds([self.root, *self.root.children(recursive=True)])

    def _sample(self) -> None:
        last, at = self._cpu(), time.monotonic()
        while not self._stop.wait(self.every_s):
            now_cpu, now = self._cpu(), time.monotonic()
            self.samples.append((now_cpu - last) / max(now - at, 1e-6) > 0.5)
            last, at = now_cpu, now

    @property
    def fraction(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0
