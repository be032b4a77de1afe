"""The Dagster instance: DAGSTER_HOME under VBATCH_HOME, configured from the repo's dagster.yaml (single
machine), or for cluster mode: dagster-postgres storage and dagster-celery's run launcher, with the secrets
left to the environment (``{env: ...}``: the UI shows the instance's config)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

from vbatch_pipelines.paths import write_private
from vbatch_pipelines.settings import Settings

# The repo's dagster.yaml and workspace.yaml, shipped in the package (links to them in the source tree, the files
# themselves in a wheel), so an installed vbatch finds them wherever it runs.
DAGSTER_YAML = Path(__file__).with_name("dagster.yaml")
WORKSPACE_YAML = Path(__file__).with_name("workspace.yaml")
GPU_POOL = "gpu"
INFERENCE_POOL = "inference"


def postgres_storage(url: str, *, password_env: str | None = None) -> dict:
    """A dagster-postgres storage block; psycopg2 explicitly (SQLAlchemy 2.1 would pick psycopg 3). With
    ``password_env`` the password is not written: the block names that variable instead."""
    parts = urlsplit(url)
    if parts.scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise ValueError(f"VBATCH_DAGSTER_DATABASE_URL must be a postgresql:// URL, got {url!r}")
    db = {
        "username": unquote(parts.username) if parts.username else "postgres",
        "hostname": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
        "db_name": parts.path.lstrip("/") or "postgres",
        "scheme": "postgresql+psycopg2",
    }
    if parts.password:
        db["password"] = {"env": password_env} if password_env else unquote(parts.password)
    return {"postgres": {"postgres_db": db}}


def instance_config(settings: Settings, *, cluster: bool = False) -> dict:
    """The repo's dagster.yaml plus storage: dagster-postgres when a URL is set, else SQLite under
    DAGSTER_HOME (Dagster's own layout) with vbatch's event log class (``dagster_ext/event_log.py``). In cluster
    mode, ``cluster_instance`` replaces the launcher and storage."""
    config = yaml.safe_load(DAGSTER_YAML.read_text())
    if cluster:
        config.update(cluster_instance(settings, config))
    elif settings.dagster.database_url:
        config["storage"] = postgres_storage(settings.dagster.database_url)
    else:
        config["event_log_storage"] = {
            "module": "vbatch_pipelines.dagster_ext.event_log", "class": "SqliteEventLogStorage",
            "config": {"base_dir": str(settings.dagster.home / "history" / "runs")}}
    return config


def cluster_instance(settings: Settings, base: dict) -> dict:
    """Cluster mode's instance: PostgreSQL storage (pool limits live there, so they hold cluster-wide), runs as
    Celery tasks through the broker (``ClusterRunLauncher``), compute logs and artifacts in the shared store (the
    UI shows a run's output whichever node ran it). The Dagster database's password and the broker URL are
    named, not written: ``cluster_env`` derives the one, the operator sets the other."""
    from vbatch_pipelines.cluster.config import (
        BROKER_ENV,
        DAGSTER_PASSWORD_ENV,
        DEFAULT_QUEUE,
        GPU_QUEUE,
        QUEUED_RUN_TIMEOUT_S,
        check_cluster,
    )
    from vbatch_pipelines.dagster_ext._compat import ARTIFACT_STORAGE, COMPUTE_LOG_MANAGER

    check_cluster(settings)
    shared = settings.paths().shared_dagster_dir
    monitoring = dict(base.get("run_monitoring") or {}, enabled=True,
                      start_timeout_seconds=QUEUED_RUN_TIMEOUT_S)  # a run waits in its queue for a free worker
    return {
        "storage": postgres_storage(settings.dagster.database_url, password_env=DAGSTER_PASSWORD_ENV),
        "run_launcher": {"module": "vbatch_pipelines.dagster_ext.cluster_launcher", "class": "ClusterRunLauncher",
                         "config": {"broker": {"env": BROKER_ENV}, "backend": {"env": BROKER_ENV},
                                    "default_queue": DEFAULT_QUEUE, "gpu_queue": GPU_QUEUE, "gpu_pools": [GPU_POOL]}},
        "run_monitoring": monitoring,
        "compute_logs": {**COMPUTE_LOG_MANAGER, "config": {"base_dir": str(shared / "logs")}},
        "local_artifact_storage": {**ARTIFACT_STORAGE, "config": {"base_dir": str(shared / "storage")}},
    }


def prepare_dagster_home(settings: Settings, *, cluster: bool = False) -> Path:
    """Write $DAGSTER_HOME/dagster.yaml (only when it changed); returns DAGSTER_HOME."""
    home = settings.dagster.home
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    text = "# Written by vbatch from " + str(DAGSTER_YAML) + (" for cluster mode" if cluster else "") + "\n" \
        + yaml.safe_dump(instance_config(settings, cluster=cluster))
    if not target.exists() or target.read_text() != text:
        write_private(target, text)  # it may hold the Dagster database's password
    return home


def set_pools(instance, gpus: int, inference_runs: int) -> None:
    """Steps that need a GPU to themselves (training, comparisons, install smoke tests) share the `gpu` pool,
    one slot per GPU (one on a CPU-only machine); batch steps share the engine through the `inference` pool,
    ``inference_runs`` at a time, and a `gpu` step takes every `inference` slot while it runs
    (``dagster_ext.pools.gpu_to_itself``)."""
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, max(1, gpus))
    instance.event_log_storage.set_concurrency_slots(INFERENCE_POOL, max(1, inference_runs))
