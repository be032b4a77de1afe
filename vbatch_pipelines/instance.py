"""The Dagster instance: DAGSTER_HOME under VBATCH_HOME, configured from the repo's dagster.yaml."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import yaml

from vbatch_pipelines.paths import write_private
from vbatch_pipelines.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGSTER_YAML = REPO_ROOT / "dagster.yaml"
WORKSPACE_YAML = REPO_ROOT / "workspace.yaml"
GPU_POOL = "gpu"
INFERENCE_POOL = "inference"


def postgres_storage(url: str) -> dict:
    """A dagster-postgres storage block; psycopg2 explicitly (SQLAlchemy 2.1 would pick psycopg 3)."""
    parts = urlsplit(url)
    if parts.scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise ValueError(f"VBATCH_DAGSTER_DATABASE_URL must be a postgresql:// URL, got {url!r}")
    db = {
        "username": parts.username or "postgres",
        "hostname": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
        "db_name": parts.path.lstrip("/") or "postgres",
        "scheme": "postgresql+psycopg2",
    }
    if parts.password:
        db["password"] = parts.password
    return {"postgres": {"postgres_db": db}}


def instance_config(settings: Settings) -> dict:
    """The repo's dagster.yaml plus storage: dagster-postgres when a URL is set, else SQLite under
    DAGSTER_HOME (Dagster's own layout) with vbatch's event log class (``dagster_storage.py``)."""
    config = yaml.safe_load(DAGSTER_YAML.read_text())
    if settings.dagster_database_url:
        config["storage"] = postgres_storage(settings.dagster_database_url)
    else:
        config["event_log_storage"] = {
            "module": "vbatch_pipelines.dagster_storage", "class": "SqliteEventLogStorage",
            "config": {"base_dir": str(settings.dagster_home / "history" / "runs")}}
    return config


def prepare_dagster_home(settings: Settings) -> Path:
    """Write $DAGSTER_HOME/dagster.yaml (only when it changed); returns DAGSTER_HOME."""
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    text = "# Written by vbatch from " + str(DAGSTER_YAML) + "\n" + yaml.safe_dump(instance_config(settings))
    if not target.exists() or target.read_text() != text:
        write_private(target, text)  # it may hold the Dagster database's password
    return home


def set_pools(instance, gpus: int, inference_runs: int) -> None:
    """Steps that need a GPU to themselves (training, comparisons, install smoke tests) share the `gpu` pool,
    one slot per GPU (one on a CPU-only machine); batch steps share the engine through the `inference` pool,
    ``inference_runs`` at a time, and a `gpu` step takes every `inference` slot while it runs
    (``defs.gpu.gpu_to_itself``)."""
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, max(1, gpus))
    instance.event_log_storage.set_concurrency_slots(INFERENCE_POOL, max(1, inference_runs))
