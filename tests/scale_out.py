"""What the scale-out tests share (issue 18): cluster mode's processes and vLLM replicas that vbatch did not start.

- ``running_cluster``: `vbatch up --mode cluster` (API, Dagster webserver and daemon on PostgreSQL) handing runs
  through a Redis broker to two `vbatch worker` nodes, each with a home of its own and, where this machine can
  make them, a network namespace of its own (tests/node_network.py; loopback otherwise), all sharing one store
  directory and both PostgreSQL databases (fresh ones, dropped afterwards). The transformers engine unless the
  caller's env says otherwise.
- ``Replica``: a vLLM CPU server of the tiny model on a fixed port, as a pod on another node runs it (bound to
  every address when the nodes have namespaces, so they reach it at their host-side address).

The ``redis_url`` and ``replicas`` fixtures (conftest.py) start the broker and two replicas with these."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import pytest

from tests.conftest import CLI, jsonl, settled_survivors, start_process
from tests.node_network import NodeNetwork, Relay, namespaces_unavailable, node_networks
from tests.postgres_server import fresh_database
from tests.test_api import _wait_batch
from vbatch_pipelines.models.registry import TINY_MODEL_ID, ModelSpec
from vbatch_pipelines.names import NODE_TAG
from vbatch_pipelines.net import free_port, local_http

ROOT = Path(__file__).resolve().parents[1]
REPLICAS_KEY = "replicas-test-key"  # what the test replicas take (VBATCH_ENGINES_API_KEY of the platforms using them)


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url
    netloc = f"{parts.username or ''}:{password}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _seen_from(env: dict, host: str) -> dict:
    """``env`` with its services' loopback URLs (databases, broker, Dagster, VBATCH_ENGINES) naming ``host``."""
    return {key: re.sub(r"(?<=[/@])127\.0\.0\.1(?=:\d)", host, value) if key.startswith("VBATCH_") else value
            for key, value in env.items()}


@dataclass
class Node:
    name: str
    home: Path
    env: dict
    network: NodeNetwork | None = None  # its namespace; None: on this machine's loopback
    process: subprocess.Popen | None = None
    banner: str = ""

    def start(self) -> None:
        argv = [*CLI, "worker", "--node", self.name, "--gpus", "1", "--concurrency", "1"]
        self.process, self.banner = start_process(self.network.run(argv) if self.network else argv, self.env,
                                                  "Ctrl-C stops it.", 240, f"the node {self.name}'s worker", ROOT)

    def kill(self) -> list[int]:
        """SIGKILL the worker and every process under it at once: the node is gone."""
        root = psutil.Process(self.process.pid)
        victims = [root, *root.children(recursive=True)]
        for victim in victims:
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.process.wait(timeout=30)
        return [victim.pid for victim in victims]

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is a live process of this node's worker."""
        try:
            return any(parent.pid == self.process.pid for parent in psutil.Process(pid).parents())
        except psutil.NoSuchProcess:
            return False


@dataclass
class Cluster:
    env: dict
    home: Path
    store: Path
    api_url: str
    dagster_url: str
    nodes: dict[str, Node]
    instance: object
    secrets: list[str]
    sources: Path
    process: subprocess.Popen | None = None
    banner: str = ""
    gpu_claims: list[int] = field(default_factory=list)

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.api_url + "/v1", api_key="unused", max_retries=2)

    def submit(self, lines: list[dict]):
        client = self.client()
        uploaded = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
        return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")

    def wait_batch(self, batch_id: str, timeout: float = 240):
        return _wait_batch(self.client(), batch_id, timeout)

    def custom_ids(self, batch) -> list[str]:
        text = self.client().files.content(batch.output_file_id).text
        return [json.loads(line)["custom_id"] for line in text.splitlines() if line.strip()]

    def runs(self, **tags):
        from dagster import RunsFilter

        return self.instance.get_runs(filters=RunsFilter(tags=tags))

    def node_of(self, run) -> str | None:
        """The node a run executes on (the tag its Celery worker writes as it starts), None before that."""
        return (self.instance.get_run_by_id(run.run_id) or run).tags.get(NODE_TAG) or None

    def wait_run(self, predicate, what: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = predicate()
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"{what}: not within {timeout:.0f}s")


@contextmanager
def running_cluster(tmp: Path, tiny_model_path: Path, redis: str, **env: str) -> Iterator[Cluster]:
    """The cluster for the block, on fresh databases; ``env`` adds to (or replaces) what every process gets,
    e.g. the vLLM engine and its replicas."""
    from dagster import DagsterInstance

    with ExitStack() as stack:
        dagster_db, metadata_db = stack.enter_context(fresh_database()), stack.enter_context(fresh_database())
        networks = [] if namespaces_unavailable() else stack.enter_context(node_networks(2))
        dagster_db = _with_password(dagster_db, f"pg-{uuid.uuid4().hex[:12]}")  # the test server trusts 127.0.0.1
        store, sources = tmp / "store", tmp / "sources"
        shutil.copytree(tiny_model_path, sources / "tiny-src")
        dagster_port = free_port()
        common = {key: value for key, value in os.environ.items() if not key.startswith(("VBATCH_", "DAGSTER_"))}
        common.update(VBATCH_ENGINE="transformers", VBATCH_CURATION="off", VBATCH_STORE=str(store),
                      VBATCH_MODELS=f"{TINY_MODEL_ID}={tiny_model_path}", VBATCH_MODEL_SOURCES=str(sources),
                      VBATCH_DATABASE_URL=metadata_db, VBATCH_DAGSTER_DATABASE_URL=dagster_db, VBATCH_BROKER_URL=redis,
                      VBATCH_DAGSTER_URL=f"http://127.0.0.1:{dagster_port}", VBATCH_CLUSTER_GPUS="1",
                      PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        common.update(env)

        def home_env(home: Path) -> dict:
            return {**common, "VBATCH_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}

        home = tmp / "master"
        api_port = free_port()
        secrets = [secret for secret in (urlsplit(dagster_db).password, urlsplit(redis).password) if secret]
        nodes = {name: Node(name, tmp / name, home_env(tmp / name)) for name in ("node-a", "node-b")}
        for node, network in zip(nodes.values(), networks):
            node.network, node.env = network, _seen_from(node.env, network.host_address)
        cluster = Cluster(home_env(home), home, store, f"http://127.0.0.1:{api_port}",
                          common["VBATCH_DAGSTER_URL"], nodes, None, secrets, sources)
        relay = Relay() if networks else None
        try:
            for network in networks:
                for port in (urlsplit(metadata_db).port, dagster_port):  # PostgreSQL and Dagster: loopback only
                    relay.forward(network.host_address, port)
            cluster.process, cluster.banner = start_process(
                [*CLI, "up", "--mode", "cluster", "--api-port", str(api_port), "--dagster-port", str(dagster_port)],
                cluster.env, "Ctrl-C stops everything.", 300, "`vbatch up --mode cluster`", ROOT)
            for node in nodes.values():
                node.start()
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("VBATCH_DAGSTER_DATABASE_PASSWORD", urlsplit(dagster_db).password)
                mp.setenv("VBATCH_BROKER_URL", redis)
                cluster.instance = DagsterInstance.from_config(str(home / "dagster"))
                yield cluster
        finally:
            if cluster.instance is not None:
                cluster.instance.dispose()
            for process in [cluster.process] + [node.process for node in nodes.values()]:
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in [cluster.process] + [node.process for node in nodes.values()]:
                if process is not None:
                    process.wait(timeout=90)
            left = [entry for path in [home, *(node.home for node in nodes.values())]
                    for entry in settled_survivors(path)]
            for pid, _ in left:
                os.kill(pid, signal.SIGKILL)
            if relay is not None:
                relay.close()
            assert not left, f"still running after `vbatch up` and the workers stopped: {left}"


class Replica:
    """A vLLM server of the tiny model on a fixed port, as another node runs it (its own state directory)."""

    def __init__(self, directory: Path, tiny_model_path: Path, python: str):
        from vbatch_pipelines.engine.vllm_server import ManagedVLLMServer, VLLMServerConfig

        self.port = free_port()
        host = "127.0.0.1" if namespaces_unavailable() else "0.0.0.0"  # the nodes' host-side addresses included
        self.server = ManagedVLLMServer(ModelSpec(TINY_MODEL_ID, str(tiny_model_path)), directory,
                                        VLLMServerConfig(python=python, host=host, api_key=REPLICAS_KEY,
                                                         adapter_roots=[str(directory.parent)]))  # the tests' tmp
        self.server.choose_port = lambda: self.port  # restarted, it is found at the same address
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.server.ensure() == self.url

    def kill(self) -> None:
        os.killpg(self.server.state()["pid"], signal.SIGKILL)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of this replica's samples of ``name`` (with these label values), from its own /metrics."""
        return self.metrics(name, **labels)[name]

    def metrics(self, *names: str, **labels: str) -> dict[str, float]:
        """The sums of this replica's samples of each of ``names`` (with these label values), from one scrape."""
        totals = dict.fromkeys(names, 0.0)
        for line in local_http().get(f"{self.url}/metrics", timeout=10).text.splitlines():
            sample, _, value = line.rpartition(" ")
            name = sample.split("{", 1)[0]
            if name in totals and all(f'{key}="{wanted}"' in sample for key, wanted in labels.items()):
                totals[name] += float(value)
        return totals

    def served(self) -> float:
        """Requests this replica finished."""
        return self.metric("vllm:request_success_total")

    def models(self) -> list[str]:
        return [m["id"] for m in local_http().get(f"{self.url}/v1/models", headers=self.server.auth_headers(),
                                                  timeout=10).json()["data"]]
