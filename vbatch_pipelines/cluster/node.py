"""`vbatch worker`: one node of a cluster. It writes the node's dagster.yaml (the shared PostgreSQL instance,
dagster-celery's launcher) in its own home and runs, supervised like `vbatch up`'s services (restarted with
back-off, recorded in ``run/worker-services.json``, stopped with it):

- ``celery-default``: a Celery worker on the default queue, the node's own queue and any ``--queues``, running
  up to ``--concurrency`` runs at once;
- ``celery-gpu`` (when the node has GPUs): a Celery worker on the ``gpu`` queue with one process per GPU, which
  takes a task only when a process is free, so a GPU-bound run goes to a node with a free GPU.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from vbatch_pipelines.child_env import without_api_keys
from vbatch_pipelines.cluster.config import (
    DEFAULT_QUEUE,
    GPU_QUEUE,
    NODE_NAME,
    ClusterConfigError,
    check_cluster,
    check_node_name,
    node_queue,
)
from vbatch_pipelines.names import STEP_MEMORY_ENV
from vbatch_pipelines.processes import ProcessRegistry
from vbatch_pipelines.settings import Settings

APP = "vbatch_pipelines.dagster_ext.celery_app"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    queues: tuple[str, ...]  # what the default worker consumes
    gpus: int
    concurrency: int


def node_spec(node: str, extra_queues: list[str], gpus: int, concurrency: int) -> NodeSpec:
    check_node_name(node)
    for queue in extra_queues:
        if not NODE_NAME.match(queue.removeprefix("node.")):
            raise ClusterConfigError(f"queue name {queue!r} is not allowed (--queues): letters, digits, '-', '_'")
        if queue == GPU_QUEUE:
            raise ClusterConfigError("the gpu queue is for nodes with GPUs: use --gpus N instead of --queues gpu")
    if gpus < 0 or concurrency < 1:
        raise ClusterConfigError("--gpus takes 0 or more, --concurrency 1 or more")
    queues = tuple(dict.fromkeys([DEFAULT_QUEUE, node_queue(node), *extra_queues]))
    if len(queues) > 4:  # dagster-celery's worker refuses more (a Celery 4 limitation it still enforces)
        raise ClusterConfigError(f"a worker listens on at most 4 queues; these are {len(queues)}: {', '.join(queues)}")
    return NodeSpec(node, queues, gpus, concurrency)


def celery_argv(name: str, queues: tuple[str, ...], concurrency: int) -> list[str]:
    """dagster-celery's worker command (``dagster-celery worker start`` runs the same, with a config module
    holding the broker URL in a file): prefork pool, prefetch off (``CELERY_SETTINGS``)."""
    return [sys.executable, "-m", "celery", "-A", APP, "worker", "--loglevel", "INFO", "--pool", "prefork",
            "--concurrency", str(concurrency), "-Q", ",".join(queues), "-n", name,
            "--without-gossip", "--without-mingle"]


def run_worker(settings: Settings, spec: NodeSpec) -> int:
    """Start the node's Celery workers and supervise them until Ctrl-C or SIGTERM; then stop them and the engines
    its runs started. Small, as `vbatch up`'s supervisor: no resources."""
    from vbatch_pipelines.supervisor import (
        SupervisedProcess,
        broker_address,
        hand_over_engines,
        instance_env,
        supervise,
    )

    check_cluster(settings, "vbatch worker")
    layout = settings.paths()
    registry = ProcessRegistry(layout.run_dir, role="worker")
    registry.acquire()  # AlreadyUp when another `vbatch worker` owns this home
    try:
        stale = registry.stop_stale()
        if stale:
            print(f"Stopped what a previous `vbatch worker` left running: {', '.join(stale)}", flush=True)
        env = {**STEP_MEMORY_ENV, **without_api_keys(instance_env(settings, cluster=True)), "VBATCH_NODE": spec.name}
        logs = layout.logs_dir
        logs.mkdir(parents=True, exist_ok=True)
        default = celery_argv(f"default@{spec.name}", spec.queues, spec.concurrency)
        services = {"celery-default": SupervisedProcess("celery-default", default, env, logs / "celery-default.log")}
        if spec.gpus:
            gpu = celery_argv(f"gpu@{spec.name}", (GPU_QUEUE,), spec.gpus)
            services["celery-gpu"] = SupervisedProcess("celery-gpu", gpu, env, logs / "celery-gpu.log")
        owner = {"node": spec.name, "home": str(settings.storage.home), "role": "worker"}

        def ready(stopping) -> None:
            print(f"vbatch worker {spec.name} is up (home {settings.storage.home})\n"
                  f"  broker       {broker_address(settings.cluster.broker_url)}\n"
                  f"  queues       {', '.join(spec.queues)} ({spec.concurrency} at once)"
                  + (f"; {GPU_QUEUE} ({spec.gpus} at once)" if spec.gpus else "") + "\n"
                  f"  store        {layout.shared}\n"
                  f"  logs         {logs}\n"
                  "Ctrl-C stops it.", flush=True)

        supervise("vbatch worker", registry, owner, services, ready, lambda: hand_over_engines(settings))
        return 0
    finally:
        registry.release()
