"""Shared fixtures: the tiny model (built once), an isolated VBATCH_HOME, PostgreSQL databases, vLLM."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import tiers
from tests.postgres_server import fresh_database
from vbatch_pipelines.models.registry import TINY_MODEL_ID

# Curation needs Label Studio: tests that want it point at the session's server (the label_studio
# fixture); everything else runs with curation off so no test starts a Label Studio of its own.
os.environ["VBATCH_CURATION"] = "off"


def pytest_configure(config) -> None:
    for name, description in tiers.MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        tiers.mark_from_fixtures(item)
        tiers.check_shared_stack(item)
    # Modules with stack tests first (a stable sort): the long ones start early, in-process ones fill the gaps
    # at the end, so two xdist workers (--dist loadscope, a unit to a worker) finish close together. The modules
    # of a shared stack run one after the other, so it starts once in a run without xdist too.
    stacked = {tiers.scope_of(item.nodeid) for item in items if item.get_closest_marker(tiers.STACK)}
    first = {}
    for index, item in enumerate(items):
        first.setdefault(tiers.scope_of(item.nodeid), index)
    items.sort(key=lambda item: (tiers.scope_of(item.nodeid) not in stacked, first[tiers.scope_of(item.nodeid)]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    tiers.running(item)
    try:
        yield
    finally:
        tiers.running(None)


def pytest_xdist_make_scheduler(config, log):
    """--dist loadscope, with the modules of a shared stack as one unit (tiers.scope_of)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedStackScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return tiers.scope_of(nodeid)

    return SharedStackScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def _stack_starts_are_marked():
    """The managed vLLM and Label Studio servers, however a test reaches them, start only in ``stack`` tests."""
    from vbatch_pipelines.curation.server import ManagedLabelStudio
    from vbatch_pipelines.engine.vllm_server import ManagedVLLMServer

    with pytest.MonkeyPatch.context() as patch:
        for server in (ManagedVLLMServer, ManagedLabelStudio):
            def guarded(self, _start=server._start):
                tiers.starting(f"a {self.name} server")
                return _start(self)

            patch.setattr(server, "_start", guarded)
        yield


def cache_dir() -> Path:
    """What the tests build once per machine and reuse in every session and xdist worker: the tiny models and a
    Label Studio home past its first start (VBATCH_TEST_CACHE, default ~/.cache/vbatch/tests)."""
    return Path(os.environ.get("VBATCH_TEST_CACHE") or Path.home() / ".cache" / "vbatch" / "tests")


@functools.cache
def tiny_models_dir() -> Path:
    """The tiny models, keyed by their builder's source and the versions of what builds them (the build is
    deterministic). Tests read them and never change them."""
    import hashlib
    from importlib.metadata import version

    import vbatch_pipelines.models.tiny as builder

    key = hashlib.sha256(Path(builder.__file__).read_bytes())
    key.update(f"{version('torch')} {version('transformers')} {version('tokenizers')}".encode())
    return cache_dir() / "models" / key.hexdigest()[:16]


def _tiny(model_id: str, task: str) -> Path:
    from vbatch_pipelines.models.tiny import ensure_tiny_model

    return ensure_tiny_model(tiny_models_dir() / model_id, task)


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from vbatch_pipelines.models.registry import GENERATE

    return _tiny(TINY_MODEL_ID, GENERATE)


@pytest.fixture(scope="session")
def tiny_embed_model_path() -> Path:
    from vbatch_pipelines.models.registry import EMBED, TINY_EMBED_MODEL_ID

    return _tiny(TINY_EMBED_MODEL_ID, EMBED)


@pytest.fixture(scope="session")
def tiny_rerank_model_path() -> Path:
    from vbatch_pipelines.models.registry import SCORE, TINY_RERANK_MODEL_ID

    return _tiny(TINY_RERANK_MODEL_ID, SCORE)


@pytest.fixture()
def vbatch_home(tmp_path, tiny_model_path, monkeypatch) -> Path:
    """An isolated VBATCH_HOME serving the session's tiny model on the transformers engine."""
    home = tmp_path / "home"
    monkeypatch.setenv("VBATCH_HOME", str(home))
    monkeypatch.setenv("VBATCH_MODELS", f"{TINY_MODEL_ID}={tiny_model_path}")
    monkeypatch.setenv("VBATCH_ENGINE", "transformers")
    # Tests install the session's tiny model (and copies of it under tmp_path) as local sources.
    monkeypatch.setenv("VBATCH_MODEL_SOURCES", f"{tiny_model_path.parent},{tmp_path}")
    for name in ("VBATCH_API_KEYS", "VBATCH_ADMIN_KEYS", "VBATCH_ALLOW_REMOTE_CODE", "VBATCH_ALLOWED_HOSTS",
                 "VBATCH_EXTENSIONS", "VBATCH_REVIEW_SCHEMAS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("VBATCH_DATABASE_URL", raising=False)
    monkeypatch.delenv("VBATCH_DAGSTER_DATABASE_URL", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    return home


@pytest.fixture()
def embed_home(vbatch_home, tiny_model_path, tiny_embed_model_path, monkeypatch):
    """Both tiny models configured; the embedding one is known as such from its files (modules.json)."""
    from vbatch_pipelines.models.registry import TINY_EMBED_MODEL_ID

    monkeypatch.setenv("VBATCH_MODELS", f"{TINY_MODEL_ID}={tiny_model_path},{TINY_EMBED_MODEL_ID}={tiny_embed_model_path}")
    return vbatch_home


def chat_line(custom_id: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0,
                     **body}}


def chat_lines(n: int, prefix: str = "req", **body) -> list[dict]:
    return [chat_line(f"{prefix}-{i}", f"What is {i} plus {i % 7}?", **body) for i in range(n)]


def jsonl(lines: list[dict]) -> bytes:
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


def api_client(app, **kwargs):
    """A TestClient that calls as a local client does (Host 127.0.0.1: the no-keys guard answers it)."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://127.0.0.1", **kwargs)


@contextmanager
def chromium_browser():
    """Debian's chromium, headless, driven by Playwright (the console's and the Dagster UI's browser tests)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: `make test` installs it (apt-get install chromium)")
    tiers.starting("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def serving(app) -> Iterator[str]:
    """``app`` on a real port in this process (for clients that speak HTTP, not ASGI: the openai SDK, Label
    Studio's webhooks); its URL."""
    import threading

    import uvicorn

    from vbatch_pipelines.net import free_port, wait_http

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    assert wait_http(url + "/health", 30)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def openai_error(response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI-style error body of ``response``, checked to have ``status`` (and ``code``, ``param``)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def build_gold_star_dataset(resources: dict, instance=None, run_config: dict | None = None):
    """Materialize the dataset job's assets (gold stars, preference pairs) with their checks, as the job does
    (``run_config``: as the launchpad gives it, e.g. a dataset_filter)."""
    from dagster import DagsterInstance, materialize

    from vbatch_pipelines.defs.curation import DATASET_CHECKS, gold_star_dataset, preference_dataset

    return materialize([gold_star_dataset, preference_dataset, *DATASET_CHECKS], resources=resources,
                       instance=instance or DagsterInstance.ephemeral(), run_config=run_config)


def replaced(resource, **changes):
    """A copy of a (flat) resource with some fields changed: how tests configure vbatch in-process."""
    return type(resource)(**{**resource.model_dump(), **changes})


class Platform:
    """Resources and helpers bound to one VBATCH_HOME (and optionally other DB URLs)."""

    def __init__(self, **overrides):
        from resources.factory import build_resources
        from vbatch_pipelines.settings import load_settings

        self.settings = load_settings()
        self.resources = build_resources(self.settings, defer_secrets=False).replace(**overrides)
        self.db = self.resources.metadata_db.db
        self.file_store = self.resources.file_store
        self.registry = self.resources.model_registry

    def configure(self, name: str, **changes) -> None:
        """Change fields of the resource ``name`` (a flat one: trainer, retraining_policy)."""
        self.resources = self.resources.replace(**{name: replaced(self.resources[name], **changes)})

    def submit(self, data: bytes, endpoint: str = "/v1/chat/completions", **kwargs):
        from vbatch_pipelines.batch.service import create_batch
        from vbatch_pipelines.files import store_file
        from vbatch_pipelines.store.models import DEFAULT_OWNER

        stored = store_file(self.db, self.file_store.files_dir, io.BytesIO(data), "input.jsonl", "batch",
                            owner=kwargs.get("owner", DEFAULT_OWNER))
        return create_batch(self.db, input_file_id=stored.id, endpoint=endpoint, **kwargs)

    def materialize(self, batch_id: str, instance=None, raise_on_error: bool = True):
        from dagster import DagsterInstance, materialize

        from vbatch_pipelines.defs.batches import batch_input, batch_output
        from vbatch_pipelines.partitions import batch_partitions

        instance = instance or DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(batch_partitions.name, [batch_id])
        return materialize([batch_input, batch_output], partition_key=batch_id, resources=self.resources,
                           instance=instance, raise_on_error=raise_on_error)

    def materialize_together(self, batch_ids: list[str], instance=None, raise_on_error: bool = True):
        """The batches as the API launches batches created together: one run over their partition range."""
        from dagster import DagsterInstance, materialize

        from vbatch_pipelines.defs.batches import batch_input, batch_output
        from vbatch_pipelines.names import batch_run_tags
        from vbatch_pipelines.partitions import batch_partitions

        instance = instance or DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(batch_partitions.name, batch_ids)
        return materialize([batch_input, batch_output], tags=batch_run_tags(batch_ids), resources=self.resources,
                           instance=instance, raise_on_error=raise_on_error)

    def batch(self, batch_id: str):
        from vbatch_pipelines.batch.service import get_batch

        return get_batch(self.db, batch_id)

    def results(self, batch_id: str) -> tuple[list[dict], list[dict]]:
        directory = self.file_store.batch_dir(batch_id)
        out = [json.loads(x) for x in (directory / "output.jsonl").read_text().splitlines()] \
            if (directory / "output.jsonl").exists() else []
        err = [json.loads(x) for x in (directory / "errors.jsonl").read_text().splitlines()] \
            if (directory / "errors.jsonl").exists() else []
        return out, err


@pytest.fixture()
def platform(vbatch_home) -> Platform:
    return Platform()


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    with fresh_database() as url:
        yield url


@dataclass(frozen=True)
class LabelStudioConnection:
    url: str
    token: str


ARISTOTLE_DDL = Path(__file__).with_name("data") / "aristotle.sql"


@pytest.fixture()
def aristotle_url() -> Iterator[str]:
    """A fresh Aristotle database (the design notes' DDL) in the test PostgreSQL, dropped afterwards."""
    with aristotle_database() as url:
        yield url


@contextmanager
def aristotle_database() -> Iterator[str]:
    import sqlalchemy as sa

    from vbatch_pipelines.store.db import normalize_url

    with fresh_database() as url:
        engine = sa.create_engine(normalize_url(url))
        with engine.begin() as connection:
            connection.exec_driver_sql(ARISTOTLE_DDL.read_text())
        engine.dispose()
        yield url


CLI = [sys.executable, "-m", "vbatch_pipelines.cli"]


def start_process(argv: list[str], env: dict, ready: str, timeout: float, what: str,
                  cwd: Path | None = None) -> tuple[subprocess.Popen, str]:
    """A command that starts a stack (``what``), in the background; returns it and its output once it printed
    ``ready`` (its banner), or fails the test with that output after ``timeout`` s or when it exits first. Its
    output is read on to the end by a thread, so a chatty process never blocks on a full pipe."""
    import queue
    import threading

    tiers.starting(what)
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout] and None, daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        if ready in line:
            return process, "".join(seen)
    process.kill()
    pytest.fail(f"{what} did not come up in {timeout:.0f}s:\n{''.join(seen)[-3000:]}")


def start_up(env: dict, *args: str) -> tuple[subprocess.Popen, str]:
    """`vbatch up` in a subprocess; returns it once it printed its banner (and the banner)."""
    return start_process([*CLI, "up", *args], env, "Ctrl-C stops everything", 300, "`vbatch up`")


class Stack:
    """`vbatch up` on a home of its own (API, Dagster webserver and daemon, the engine), driven like a user
    does: the official openai SDK against its API."""

    def __init__(self, env: dict, api_url: str, process: subprocess.Popen):
        self.env, self.api_url, self.process = env, api_url, process
        self.extra: list[subprocess.Popen] = []
        self.up_args: tuple[str, ...] = ()

    def restart_up(self) -> str:
        """`vbatch up` again on the same home and ports (after the previous one died); its banner."""
        self.process, banner = start_up(self.env, *self.up_args)
        return banner

    def client(self, api_key: str = "unused", base_url: str | None = None):
        import openai

        return openai.OpenAI(base_url=(base_url or self.api_url) + "/v1", api_key=api_key, max_retries=0)

    def start_api(self, **env) -> tuple[str, subprocess.Popen]:
        """Another API process on the same home (to restart it, or to run it with other settings)."""
        from vbatch_pipelines.net import free_port, wait_http

        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app",
                                    "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                   env={**self.env, **env}, start_new_session=True)
        self.extra.append(process)
        url = f"http://127.0.0.1:{port}"
        assert wait_http(url + "/health", 60), f"{url} did not answer"
        return url, process


@contextmanager
def running_stack(home: Path, tiny_model_path: Path, **env_overrides: str) -> Iterator[Stack]:
    """The platform on the vLLM engine, up for the block, stopped (with its engine) after it."""
    import signal

    from vbatch_pipelines.net import free_port

    api_port, dagster_port = free_port(), free_port()
    env = dict(os.environ)
    for key in ("VBATCH_DATABASE_URL", "VBATCH_DAGSTER_DATABASE_URL", "VBATCH_API_KEYS", "VBATCH_ADMIN_KEYS"):
        env.pop(key, None)
    env.update(VBATCH_HOME=str(home), VBATCH_ENGINE="vllm", VBATCH_VLLM_PYTHON=vllm_python(),
               VBATCH_MODELS=f"{TINY_MODEL_ID}={tiny_model_path}", DAGSTER_HOME=str(home / "dagster"),
               VBATCH_DAGSTER_URL=f"http://127.0.0.1:{dagster_port}")
    env.update(env_overrides)  # may replace any of the above (VBATCH_MODELS with more models)
    up_args = ("--api-port", str(api_port), "--dagster-port", str(dagster_port))
    process, _ = start_up(env, *up_args)
    stack = Stack(env, f"http://127.0.0.1:{api_port}", process)
    stack.up_args = up_args
    try:
        yield stack
    finally:
        for extra in stack.extra:
            if extra.poll() is None:
                os.killpg(extra.pid, signal.SIGKILL)
        stack.process.send_signal(signal.SIGTERM)  # the current `vbatch up` (a test may have restarted it)
        stack.process.wait(timeout=90)
        left = settled_survivors(home)
        for pid, _ in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"still running after `vbatch up` stopped: {left}"


_shared_stacks: dict[str, tuple[ExitStack, Stack]] = {}  # the shared stacks up now, by fixture name


def shared_stack(name: str, start: Callable[[], AbstractContextManager[Stack]]) -> Stack:
    """The shared stack ``name`` (tiers.SHARED_STACKS), started on its group's first use; it is stopped once
    the last test of its group ran (``pytest_runtest_teardown``), not left idle until the session ends."""
    if name not in _shared_stacks:
        exits = ExitStack()
        _shared_stacks[name] = exits, exits.enter_context(start())
    return _shared_stacks[name][1]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem) -> None:
    group = tiers.scope_of(item.nodeid)
    if group in _shared_stacks and (nextitem is None or tiers.scope_of(nextitem.nodeid) != group):
        _shared_stacks.pop(group)[0].close()


@pytest.fixture(scope="session", autouse=True)
def _shared_stacks_stop_at_the_end():
    yield
    while _shared_stacks:
        _shared_stacks.popitem()[1][0].close()


@pytest.fixture()
def default_stack(tmp_path_factory, tiny_model_path) -> Stack:
    """`vbatch up` on vLLM serving the tiny chat model, curation and the retrain schedule off, for the modules
    of tiers.SHARED_STACKS["default_stack"]."""
    return shared_stack("default_stack", lambda: running_stack(
        tmp_path_factory.mktemp("default-stack"), tiny_model_path, VBATCH_CURATION="off", VBATCH_RETRAIN_CRON="off"))


@pytest.fixture()
def models_stack(tmp_path_factory, tiny_model_path, tiny_embed_model_path, tiny_rerank_model_path) -> Stack:
    """`vbatch up` on vLLM serving the tiny chat, embedding and cross-encoder models (an engine each, all three
    up at once), for the modules of tiers.SHARED_STACKS["models_stack"]."""
    from vbatch_pipelines.models.registry import TINY_EMBED_MODEL_ID, TINY_RERANK_MODEL_ID

    models = (f"{TINY_MODEL_ID}={tiny_model_path},{TINY_EMBED_MODEL_ID}={tiny_embed_model_path},"
              f"{TINY_RERANK_MODEL_ID}={tiny_rerank_model_path}")
    return shared_stack("models_stack", lambda: running_stack(
        tmp_path_factory.mktemp("models-stack"), tiny_model_path, VBATCH_MODELS=models))


@contextmanager
def platform_of(stack: Stack) -> Iterator[Platform]:
    """Resources bound to a running stack's home, to set up what a test needs as the platform would."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("VBATCH_HOME", "VBATCH_ENGINE", "VBATCH_VLLM_PYTHON", "VBATCH_MODELS", "DAGSTER_HOME"):
            mp.setenv(key, stack.env[key])
        mp.delenv("VBATCH_DATABASE_URL", raising=False)
        yield Platform()


def submit_batch(client, lines: list[dict] | str, endpoint: str):
    """Upload ``lines`` (or a file's text) and create a batch on ``endpoint`` with the openai SDK, as a user does."""
    data = lines.encode() if isinstance(lines, str) else jsonl(lines)
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")


def on_both_engines(stack: Stack, model_id: str, fallback: type, ask) -> tuple:
    """What ``await ask(engine)`` gives on the stack's vLLM engine and on the transformers ``fallback`` engine
    class for the same model (each engine closed after), to compare the two."""
    import asyncio

    async def run(engine):
        try:
            return await ask(engine)
        finally:
            await engine.aclose()

    with platform_of(stack) as platform:
        spec = platform.registry.lookup(model_id)
        served = platform.resources.inference_engine.open(spec)
        assert served.backend == "vllm"
        return asyncio.run(run(served)), asyncio.run(run(fallback(spec)))


def survivors(home: Path) -> list:
    """Processes still running with this VBATCH_HOME: after `vbatch up` stops there must be none."""
    import psutil

    # Read once, at the scan: a process may exit (and stay a zombie until reaped) before a caller looks again;
    # ``process.info["cmdline"]`` is what it ran.
    return [process for process in psutil.process_iter(["environ", "cmdline", "status"])
            if process.pid != os.getpid() and (process.info["environ"] or {}).get("VBATCH_HOME") == str(home)
            and process.info["cmdline"] and process.info["status"] not in (None, psutil.STATUS_ZOMBIE)]


def settled_survivors(home: Path, grace_s: float = 15.0) -> list:
    """Survivors that are still there after ``grace_s`` (a process may be in the middle of exiting when its
    parent returns), with their command lines for the report."""
    import psutil

    deadline = time.monotonic() + grace_s
    while (left := survivors(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    report = []
    for process in left:
        try:
            report.append((process.pid, process.cmdline()[:4]))
        except psutil.Error:
            continue
    return report


def vllm_python() -> str:
    from vbatch_pipelines.engine.vllm_env import find_vllm_python
    from vbatch_pipelines.settings import load_settings

    settings = load_settings()
    python = os.environ.get("VBATCH_TEST_VLLM_PYTHON") or find_vllm_python(
        settings.engine.vllm_python, settings.storage.envs_dir, settings.engine.gpus)
    if not python:
        pytest.fail("vLLM is not installed: run `vbatch engine install` (make test does) or set "
                    "VBATCH_TEST_VLLM_PYTHON")
    return python


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """Cluster mode's broker: VBATCH_TEST_REDIS_URL, else Debian's redis-server on a free port with a password
    (so the tests see that it never lands in a file)."""
    from tests.node_network import namespaces_unavailable
    from tests.redis_server import redis_server

    given = os.environ.get("VBATCH_TEST_REDIS_URL")
    if given:
        yield given
        return
    bind = "127.0.0.1" if namespaces_unavailable() else "0.0.0.0"  # nodes in namespaces reach it at their veth's
    with redis_server(tmp_path_factory.mktemp("redis"), f"redis-{uuid.uuid4().hex[:12]}", bind=bind) as url:
        yield url


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, tiny_model_path) -> Iterator[list]:
    """Two vLLM CPU replicas of the tiny model (tests.scale_out.Replica), started side by side, stopped after the
    module."""
    import threading

    from tests.scale_out import Replica

    python = vllm_python()
    pair = [Replica(tmp_path_factory.mktemp(f"node-{name}"), tiny_model_path, python) for name in "ab"]
    threads = [threading.Thread(target=replica.start) for replica in pair]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        yield pair
    finally:
        for replica in pair:
            replica.server.stop()


def label_studio_template(envs_dir: Path) -> Path:
    """A Label Studio home whose first start (~400 migrations, its admin user and token) is done: built once per
    machine and Label Studio env (the first session or xdist worker builds it, the others wait), copied by each
    session, so their servers start warm (seconds instead of a minute)."""
    from vbatch_pipelines.curation.server import ManagedLabelStudio, managed_env_dir
    from vbatch_pipelines.net import free_port
    from vbatch_pipelines.paths import build_once

    def first_start(building: Path) -> None:
        server = ManagedLabelStudio(building, envs_dir, free_port())
        try:
            server.ensure()
        finally:
            server.stop()
        for leftover in building.glob("server.*"):  # its pid, port and log: each copy starts its own
            leftover.unlink()

    return build_once(cache_dir() / "label-studio" / managed_env_dir(envs_dir).name, first_start, "data")


@pytest.fixture(scope="session")
def label_studio_server(tmp_path_factory):
    """The real Label Studio, started once for the session by vbatch's own manager (managed env)."""
    from vbatch_pipelines.curation.server import ManagedLabelStudio
    from vbatch_pipelines.net import free_port
    from vbatch_pipelines.settings import load_settings

    home = tmp_path_factory.mktemp("label-studio-home")
    envs_dir = load_settings().storage.envs_dir
    server = ManagedLabelStudio(home / "label-studio", envs_dir, free_port())
    if not server.installed():
        pytest.fail("Label Studio is not installed: run `vbatch label-studio install` (make test does)")
    shutil.copytree(label_studio_template(envs_dir), server.state_dir)
    conn = LabelStudioConnection(server.ensure(), server.credentials()["token"])
    try:
        yield server, conn
    finally:
        server.stop()


@pytest.fixture()
def curation_home(vbatch_home, label_studio_server, monkeypatch):
    """vbatch_home with curation on, using the session's Label Studio."""
    _, conn = label_studio_server
    monkeypatch.setenv("VBATCH_CURATION", "on")
    monkeypatch.setenv("VBATCH_LABEL_STUDIO_URL", conn.url)
    monkeypatch.setenv("VBATCH_LABEL_STUDIO_TOKEN", conn.token)
    monkeypatch.setenv("VBATCH_WEBHOOK_SECRET", "test-webhook-secret")
    return vbatch_home


def pytest_terminal_summary(terminalreporter) -> None:
    """Where the cluster tests' nodes ran (tests/node_network.py), when any ran."""
    from tests.node_network import namespaces_unavailable

    if namespaces_unavailable.cache_info().currsize:
        why = namespaces_unavailable()
        terminalreporter.write_line("cluster test nodes: " + (f"on loopback ({why})" if why else
                                                             "each in a network namespace of its own (veth pair)"))


def record_review(db, task_id: int, review, reviewer: str = "expert") -> bool:
    """What the Label Studio sensor records when one expert reviews a task (annotation id = task id); that path has
    its own tests against the real Label Studio."""
    from vbatch_pipelines.curation.service import AnnotationReview, apply_reviews

    return apply_reviews(db, task_id, [AnnotationReview(task_id, reviewer, review)])


class LabelStudioSession:
    """A person logged into Label Studio in a browser: its session cookie and CSRF token."""

    def __init__(self, url: str, email: str, password: str):
        self.http = httpx.Client(base_url=url, timeout=60, follow_redirects=False)
        self.http.get("/user/login/")
        csrf = self.http.cookies.get("csrftoken", "")
        answer = self.http.post("/user/login/", data={"email": email, "password": password,
                                                      "csrfmiddlewaretoken": csrf},
                                headers={"Referer": url + "/", "X-CSRFToken": csrf})
        assert answer.status_code == 302 and "login" not in answer.headers.get("location", ""), answer.text[:500]
        self.csrf = self.http.cookies.get("csrftoken", csrf)
        self.url = url

    def get(self, path: str, **params) -> httpx.Response:
        return self.http.get(path, params=params)

    def send(self, method: str, path: str, body: dict) -> httpx.Response:
        return self.http.request(method, path, json=body, headers={"X-CSRFToken": self.csrf,
                                                                   "Referer": self.url + "/"})

    def project_ids(self) -> set[int]:
        return {p["id"] for p in self.get("/api/projects/").json()["results"]}
