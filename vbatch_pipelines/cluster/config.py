"""What cluster mode needs, and the names both sides of the broker agree on.

Queues (Celery, through the Redis broker):
- ``dagster`` (dagster-celery's default queue): every node's worker takes runs from it.
- ``gpu``: runs with a step in the ``gpu`` pool (training, comparisons, install smoke tests). Only nodes started
  with GPUs consume it, through a worker of their own whose concurrency is the node's GPU count and which takes
  a task only when a process is free (no prefetch): a GPU run goes to a node with a free GPU, or waits.
- ``node.<name>``: one node's own queue, to pin a run to a node (``dagster-celery/queue`` run tag).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

from vbatch_pipelines.settings import Settings

DEFAULT_QUEUE = "dagster"
GPU_QUEUE = "gpu"
NODE_QUEUE_PREFIX = "node."
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")  # a Celery node name part and a queue suffix

BROKER_ENV = "VBATCH_BROKER_URL"
DAGSTER_PASSWORD_ENV = "VBATCH_DAGSTER_DATABASE_PASSWORD"  # derived from VBATCH_DAGSTER_DATABASE_URL by vbatch

# A run waits in its queue until a worker (for `gpu`, a node with a free GPU) takes it: a day, a batch's window.
QUEUED_RUN_TIMEOUT_S = 24 * 3600


class ClusterConfigError(ValueError):
    """Cluster mode was asked for without what it needs; the message names each missing variable."""


def _postgres(url: str | None) -> bool:
    return bool(url) and url.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def check_cluster(settings: Settings, command: str = "cluster mode") -> None:
    """Refuse cluster mode unless every node can share the Dagster instance, the metadata DB and the broker."""
    missing = []
    if not _postgres(settings.dagster.database_url):
        missing.append("VBATCH_DAGSTER_DATABASE_URL (a postgresql:// URL: the Dagster instance every node shares)")
    if not _postgres(settings.storage.database_url):
        missing.append("VBATCH_DATABASE_URL (a postgresql:// URL: the metadata DB every node shares; SQLite is "
                       "one machine's)")
    if not settings.cluster.broker_url:
        missing.append(f"{BROKER_ENV} (a redis:// URL: the broker that hands runs to the workers)")
    if missing:
        raise ClusterConfigError(f"{command} needs " + "; ".join(missing))


def check_broker(url: str, timeout_s: float = 5.0) -> None:
    """Refuse to start when the broker does not answer, rather than have every launch fail later."""
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s).ping()
    except redis.RedisError as exc:
        parts = urlsplit(url)
        raise ClusterConfigError(f"the broker at {parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path} "
                                 f"(VBATCH_BROKER_URL) does not answer: {exc}") from None


def cluster_env(settings: Settings) -> dict[str, str]:
    """What the cluster's dagster.yaml names besides the broker URL: the Dagster database's password, taken
    from VBATCH_DAGSTER_DATABASE_URL. Every process that opens the instance gets it."""
    password = urlsplit(settings.dagster.database_url or "").password
    return {DAGSTER_PASSWORD_ENV: unquote(password)} if password else {}


def node_queue(node: str) -> str:
    return NODE_QUEUE_PREFIX + node


def check_node_name(node: str) -> str:
    if not NODE_NAME.match(node):
        raise ClusterConfigError(f"node name {node!r} is not allowed: letters, digits, '-' and '_', starting with "
                                 "a letter or digit, at most 63 characters (--node)")
    return node
