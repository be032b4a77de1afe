"""Cluster mode for real: `vbatch up --mode cluster` (API, Dagster webserver and daemon on PostgreSQL) hands runs
through a Redis broker (Debian's `redis-server`, started here unless VBATCH_TEST_REDIS_URL names one) to two
`vbatch worker` nodes, each with a home of its own and, where this machine can make them, a network namespace of
its own (loopback otherwise), all sharing one store directory and both PostgreSQL databases. Batches go in
through the official openai SDK; which node ran a run is read from the tags its Celery worker wrote. Nodes are
killed with SIGKILL (the worker and every process under it, as a node that dies) in the middle of a batch and
while holding the `gpu` pool's only slot. The transformers engine: no vLLM needed (the
harness, tests/scale_out.py, is shared with tests/test_cluster_replicas.py, which runs it on two vLLM replicas)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from tests.conftest import chat_lines, jsonl
from tests.node_network import namespaces_unavailable
from tests.scale_out import CLI, ROOT, Cluster, running_cluster
from vbatch_pipelines.names import (
    BATCH_ID_TAG,
    CELERY_QUEUE_TAG,
    CELERY_WORKER_PID_TAG,
    CELERY_WORKER_TAG,
    MODEL_ID_TAG,
    NODE_TAG,
)
from vbatch_pipelines.net import free_port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_path, redis_url) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster"), tiny_model_path, redis_url) as running:
        yield running


def test_cluster_mode_names_what_it_needs(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("VBATCH_", "DAGSTER_"))}
    env.update(VBATCH_HOME=str(tmp_path / "home"), VBATCH_CURATION="off", VBATCH_ENGINE="transformers",
               PYTHONPATH=str(ROOT))
    up = subprocess.run([*CLI, "up", "--mode", "cluster"], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 2, up.stderr
    for name in ("VBATCH_DAGSTER_DATABASE_URL", "VBATCH_DATABASE_URL", "VBATCH_BROKER_URL"):
        assert name in up.stderr
    env.update(VBATCH_DATABASE_URL="postgresql://u@127.0.0.1:5432/m", VBATCH_DAGSTER_DATABASE_URL="postgresql://u@h/d",
               VBATCH_BROKER_URL="redis://127.0.0.1:1/0")
    worker = subprocess.run([*CLI, "worker", "--node", "no/slashes"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert worker.returncode == 2 and "node name 'no/slashes' is not allowed" in worker.stderr
    env.update(VBATCH_DATABASE_URL=f"sqlite:///{tmp_path}/v.db", VBATCH_BROKER_URL="amqp://guest@h//")
    refused = subprocess.run([*CLI, "worker"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "VBATCH_BROKER_URL takes a Redis URL" in refused.stderr
    env["VBATCH_BROKER_URL"] = f"redis://:hidden@127.0.0.1:{free_port()}/0"  # nothing listens there
    sqlite = subprocess.run([*CLI, "worker"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert sqlite.returncode == 2 and "VBATCH_DATABASE_URL (a postgresql:// URL" in sqlite.stderr
    env["VBATCH_DATABASE_URL"] = "postgresql://u@127.0.0.1:5432/m"
    for command in (["worker", "--node", "n1"], ["up", "--mode", "cluster"]):
        silent = subprocess.run([*CLI, *command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert silent.returncode == 2 and "(VBATCH_BROKER_URL) does not answer" in silent.stderr, silent.stderr
        assert "hidden" not in silent.stderr


def test_the_store_holds_what_nodes_share_and_the_home_what_is_the_nodes_own(tmp_path):
    from resources import FileStore

    home, store = tmp_path / "home", tmp_path / "store"
    layout = FileStore(root=str(home), store=str(store))
    shared = [layout.files_dir, layout.batch_dir("b"), layout.datasets_dir, layout.fine_tune_dir("j"),
              layout.models_dir, layout.tiny_model_path, layout.shared_dagster_dir]
    own = [layout.engines_dir, layout.label_studio_dir, layout.run_dir, layout.logs_dir, layout.dagster_dir,
           layout.database_path]
    assert all(path.is_relative_to(store) for path in shared)
    assert all(path.is_relative_to(home) for path in own)
    assert FileStore(root=str(home)).files_dir == home / "files"  # without a store: the home, as before


NODE_REACHES = """import socket, sys
def reach(host, port):
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        return True
    except OSError:
        return False
print(*(reach(host, port) for host, port in zip(sys.argv[1::2], sys.argv[2::2])))"""


def test_each_node_has_a_network_of_its_own(cluster):
    """Where namespaces can be made, each node's worker runs in a network namespace of its own and reaches the
    master's services only at its own veth's host-side address: not at the master's loopback (the API there), not
    at the other node's veth."""
    why = namespaces_unavailable()
    if why:
        pytest.skip(f"the nodes run on loopback: {why}")
    ours = os.stat("/proc/self/ns/net").st_ino
    theirs = {name: os.stat(f"/proc/{node.process.pid}/ns/net").st_ino for name, node in cluster.nodes.items()}
    assert ours not in theirs.values() and len(set(theirs.values())) == 2, theirs
    broker = urlsplit(cluster.nodes["node-a"].env["VBATCH_BROKER_URL"])
    assert broker.hostname == cluster.nodes["node-a"].network.host_address
    api_port = urlsplit(cluster.api_url).port
    nodes = list(cluster.nodes.values())
    for node, other in zip(nodes, reversed(nodes)):
        probe = subprocess.run(node.network.run([sys.executable, "-c", NODE_REACHES, node.network.host_address,
                                                 str(broker.port), "127.0.0.1", str(api_port),
                                                 other.network.host_address, str(broker.port)]),
                               capture_output=True, text=True, timeout=60)
        assert probe.stdout.split() == ["True", "False", "False"], (node.name, probe.stdout, probe.stderr)


def test_the_instance_names_its_secrets_and_routes_runs_through_the_broker(cluster):
    """Every node's dagster.yaml: PostgreSQL storage, dagster-celery's launcher, the password and the broker URL
    named (``env:``), never written; the UI's instance page shows neither; the gpu pool's limit is the cluster's."""
    import yaml

    for home in [cluster.home, *(node.home for node in cluster.nodes.values())]:
        text = (home / "dagster" / "dagster.yaml").read_text()
        assert not [secret for secret in cluster.secrets if secret in text], home
        config = yaml.safe_load(text)
        assert config["run_launcher"]["class"] == "ClusterRunLauncher"
        assert config["run_launcher"]["config"]["broker"] == {"env": "VBATCH_BROKER_URL"}
        assert config["storage"]["postgres"]["postgres_db"]["password"] == {"env": "VBATCH_DAGSTER_DATABASE_PASSWORD"}
        assert config["compute_logs"]["config"]["base_dir"].startswith(str(cluster.store))
    info = httpx.post(cluster.dagster_url + "/graphql", json={"query": "{ instance { info } }"}, timeout=30).json()
    shown = info["data"]["instance"]["info"]
    assert "ClusterRunLauncher" in shown and not [secret for secret in cluster.secrets if secret in shown]
    assert not [secret for secret in cluster.secrets if secret in cluster.banner]
    assert cluster.instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
    assert "cluster mode" in cluster.banner


def test_batches_land_on_both_workers(cluster):
    """While one node's only run slot is busy with a long batch, the next batch's run goes to the other node;
    each run records the Celery worker and the pool process (a process of that node's `vbatch worker`)."""
    first = cluster.submit(chat_lines(1500, prefix="first"))
    first_run = cluster.wait_run(lambda: next((r for r in cluster.runs(**{BATCH_ID_TAG: first.id})
                                               if cluster.node_of(r)), None), "first batch's run started")
    second = cluster.submit(chat_lines(40, prefix="second"))
    done = {batch.id: cluster.wait_batch(batch.id) for batch in (first, second)}
    assert {batch.status for batch in done.values()} == {"completed"}
    assert sorted(cluster.custom_ids(done[first.id])) == sorted(f"first-{i}" for i in range(1500))
    assert sorted(cluster.custom_ids(done[second.id])) == sorted(f"second-{i}" for i in range(40))
    nodes = {}
    for batch in (first, second):
        run = cluster.wait_run(lambda: next((r for r in cluster.runs(**{BATCH_ID_TAG: batch.id}) if r.is_success),
                                            None), "the batch's run succeeded")  # it ends just after its batch
        node = cluster.nodes[run.tags[NODE_TAG]]
        assert run.tags[CELERY_QUEUE_TAG] == "dagster"
        assert run.tags[CELERY_WORKER_TAG] == f"default@{node.name}"
        assert node.owns(int(run.tags[CELERY_WORKER_PID_TAG])), "the pool process is the node's"
        nodes[batch.id] = node.name
    assert nodes[first.id] == cluster.node_of(first_run)
    assert set(nodes.values()) == {"node-a", "node-b"}, nodes
    status = subprocess.run([*CLI, "status"], env=cluster.nodes["node-a"].env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert "vbatch worker node-a runs" in status.stdout and "celery-default" in status.stdout \
        and "celery-gpu" in status.stdout, status.stdout


def test_a_crashed_celery_worker_is_restarted_and_runs_pinned_to_its_node(cluster):
    """`vbatch worker` supervises its Celery workers as `vbatch up` does its services: one killed (SIGKILL) is
    restarted, and its pool processes go with it. A run tagged with a node's queue runs on that node."""
    from vbatch_pipelines.batch.service import create_batch, record_run
    from vbatch_pipelines.launch import launch_run
    from vbatch_pipelines.names import BATCH_JOB, batch_run_tags
    from vbatch_pipelines.partitions import batch_partitions
    from vbatch_pipelines.store.db import Database

    node = cluster.nodes["node-a"]
    record = node.home / "run" / "worker-services.json"
    before = json.loads(record.read_text())["services"]["celery-default"]
    main = psutil.Process(before["pid"])
    pool = main.children()
    assert pool, "a prefork worker has pool processes"
    main.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(pool, timeout=15)
    assert not alive, "pool processes die with their worker"
    after = cluster.wait_run(lambda: (lambda entry: entry if entry["pid"] != before["pid"] else None)(
        json.loads(record.read_text())["services"]["celery-default"]), "celery-default restarted", timeout=60)
    assert after["restarts"] == before["restarts"] + 1
    log = node.home / "logs" / "celery-default.log"
    cluster.wait_run(lambda: log.read_text().count("default@node-a ready.") >= 2, "the restarted worker ready", 120)

    uploaded = cluster.client().files.create(file=("pinned.jsonl", jsonl(chat_lines(30, prefix="pin"))),
                                             purpose="batch")
    db = Database(cluster.env["VBATCH_DATABASE_URL"])
    try:
        batch = create_batch(db, input_file_id=uploaded.id, endpoint="/v1/chat/completions")
        cluster.instance.add_dynamic_partitions(batch_partitions.name, [batch.id])
        run_id = launch_run(cluster.dagster_url, BATCH_JOB, {**batch_run_tags([batch.id]),
                                                             CELERY_QUEUE_TAG: "node.node-b"})
        record_run(db, [batch.id], run_id)
    finally:
        db.engine.dispose()
    done = cluster.wait_batch(batch.id)
    assert done.status == "completed" and sorted(cluster.custom_ids(done)) == sorted(f"pin-{i}" for i in range(30))
    ran = cluster.wait_run(lambda: (lambda r: r if r.is_success else None)(cluster.instance.get_run_by_id(run_id)),
                           "the pinned run succeeded")
    assert ran.tags[NODE_TAG] == "node-b" and ran.tags[CELERY_QUEUE_TAG] == "node.node-b"


TERMINATE = """mutation Terminate($runId: String!) { terminateRun(runId: $runId) { __typename
  ... on TerminateRunFailure { message } ... on PythonError { message } } }"""


def test_terminating_a_run_in_the_ui_cancels_it_on_its_node(cluster):
    """Dagster's terminate reaches the run where it executes: the run ends canceled (not failed, so it is not
    retried), what the batch wrote stays, and cancelling the batch then ends it."""
    batch = cluster.submit(chat_lines(3000, prefix="stop"))
    output = cluster.store / "batches" / batch.id / "output.jsonl"
    run = cluster.wait_run(lambda: next((r for r in cluster.runs(**{BATCH_ID_TAG: batch.id})
                                         if cluster.node_of(r) and output.exists() and output.stat().st_size),
                                        None), "the batch's run writing results", timeout=180)
    answer = httpx.post(cluster.dagster_url + "/graphql", json={"query": TERMINATE, "variables": {"runId": run.run_id}},
                        timeout=30).json()
    assert answer["data"]["terminateRun"]["__typename"] == "TerminateRunSuccess", answer
    terminated_at = time.monotonic()
    ended = cluster.wait_run(lambda: (lambda r: r if r.is_finished else None)(
        cluster.instance.get_run_by_id(run.run_id)), "the terminated run ended", timeout=60)
    print(f"\nthe terminated run ended {ended.status.value} {time.monotonic() - terminated_at:.1f}s later")
    assert ended.status.value == "CANCELED"
    written = len(output.read_text().splitlines())
    assert 0 < written < 3000
    cluster.client().batches.cancel(batch.id)
    done = cluster.wait_batch(batch.id, timeout=120)
    assert done.status == "cancelled" and done.request_counts.completed >= written
    assert not cluster.runs(**{"dagster/parent_run_id": run.run_id}), "a terminated run is not retried"


def test_a_node_killed_mid_batch_its_run_is_re_executed_on_the_other(cluster):
    """SIGKILL the node running a batch once results are being written: run monitoring finds its worker gone,
    fails the run, run retries re-execute it on the other node, and the batch completes with each custom_id
    once."""
    batch = cluster.submit(chat_lines(3000, prefix="kill"))
    output = cluster.store / "batches" / batch.id / "output.jsonl"
    run = cluster.wait_run(lambda: next((r for r in cluster.runs(**{BATCH_ID_TAG: batch.id})
                                         if cluster.node_of(r) and output.exists() and output.stat().st_size),
                                        None), "the batch's run writing results", timeout=180)
    victim = cluster.nodes[cluster.node_of(run)]
    victim.kill()
    killed_at = time.monotonic()
    done = cluster.wait_batch(batch.id, timeout=300)
    recovered = time.monotonic() - killed_at
    ids = cluster.custom_ids(done)
    assert done.status == "completed" and done.request_counts.failed == 0
    assert len(ids) == 3000 and set(ids) == {f"kill-{i}" for i in range(3000)}
    runs = {r.run_id: cluster.instance.get_run_by_id(r.run_id) for r in cluster.runs(**{BATCH_ID_TAG: batch.id})}
    assert runs[run.run_id].status.value == "FAILURE"
    retried = [r for r in runs.values() if r.tags.get("dagster/parent_run_id") == run.run_id]
    assert retried and retried[0].tags[NODE_TAG] != victim.name
    print(f"\nkilled {victim.name} mid-batch; completed on {retried[0].tags[NODE_TAG]} {recovered:.1f}s later")
    victim.start()  # back for the next test


def test_the_gpu_pool_holds_across_nodes_and_a_killed_node_frees_its_slot(cluster):
    """Two installs (their smoke test claims the `gpu` pool, limit 1) go to the `gpu` queue and start on both
    nodes at once; one waits for the slot the other holds. The holder's node is killed mid-step: its slot is
    freed, the waiting install takes it, the killed one is re-executed, both models end ready, and no two
    installed_model steps ever overlapped."""
    storage = cluster.instance.event_log_storage
    sampling = threading.Event()
    claims: list[tuple[float, list[str]]] = []

    def sample() -> None:
        while not sampling.is_set():
            claims.append((time.time(), [slot.run_id for slot in storage.get_concurrency_info("gpu").claimed_slots]))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for model_id in ("tiny-a", "tiny-b"):
            response = httpx.post(cluster.api_url + "/v1/models", timeout=60,
                                  json={"source": str(cluster.sources / "tiny-src"), "id": model_id})
            assert response.status_code == 200, response.text
        runs = cluster.wait_run(lambda: (lambda found: found if len(found) == 2 and all(
            cluster.node_of(r) for r in found) else None)(
            [r for m in ("tiny-a", "tiny-b") for r in cluster.runs(**{MODEL_ID_TAG: m})]), "both installs started")
        assert {cluster.node_of(r) for r in runs} == {"node-a", "node-b"}
        assert {cluster.instance.get_run_by_id(r.run_id).tags[CELERY_QUEUE_TAG] for r in runs} == {"gpu"}

        def holder_and_waiter():
            held = [slot.run_id for slot in storage.get_concurrency_info("gpu").claimed_slots]
            waiting = [r for r in runs if r.run_id not in held and any(
                "blocked by limit for pool gpu" in (e.user_message or "") for e in cluster.instance.all_logs(r.run_id))]
            return (held[0], waiting[0]) if len(held) == 1 and waiting else None

        holder_id, waiter = cluster.wait_run(holder_and_waiter, "one install holding the gpu slot, one waiting")
        holder = cluster.instance.get_run_by_id(holder_id)
        victim = cluster.nodes[holder.tags[NODE_TAG]]
        assert waiter.run_id != holder_id and cluster.node_of(waiter) != victim.name
        victim.kill()
        killed_at = time.time()
        listed = cluster.wait_run(lambda: (lambda ids: ids if {"tiny-a", "tiny-b"} <= ids else None)(
            {m.id for m in cluster.client().models.list().data}), "both models ready", timeout=300)
        assert {"tiny-a", "tiny-b"} <= listed
        time.sleep(1)
    finally:
        sampling.set()
        sampler.join(timeout=10)
    assert max(len(held) for _, held in claims) == 1, "never two gpu slots at once"
    assert storage.get_concurrency_info("gpu").claimed_slots == []
    assert cluster.instance.get_run_by_id(holder_id).status.value == "FAILURE"
    retry = [r for r in cluster.runs(**{"dagster/parent_run_id": holder_id})]
    assert retry and cluster.instance.get_run_by_id(retry[0].run_id).is_success
    assert cluster.instance.get_run_by_id(waiter.run_id).is_success
    steps = {}
    for run_id in (waiter.run_id, retry[0].run_id):
        events = {e.dagster_event_type.value: e.timestamp for e in cluster.instance.all_logs(run_id)
                  if e.dagster_event_type is not None and e.step_key == "installed_model"}
        steps[run_id] = (events["STEP_START"], events["STEP_SUCCESS"])
    (start1, end1), (start2, end2) = sorted(steps.values())
    assert end1 <= start2, f"installed_model steps overlapped: {steps}"
    waited = steps[waiter.run_id][0] - killed_at
    assert waited >= 0, "the waiting install started only once the killed node's slot was freed"
    print(f"\nkilled {victim.name} holding the gpu slot; the other node's install took it {waited:.1f}s later")
    victim.start()
