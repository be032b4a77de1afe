"""The one place vbatch imports Dagster's private modules (``dagster._...``), for what Dagster has no public name
for: the run-launcher and storage base classes, the body of ``dagster api execute_run`` the warm run workers run,
the pool-claim back-off they shorten, serdes' configurable-class plumbing. Each name is checked as it is
imported, and each attribute vbatch patches or overrides is checked to still exist, so an upgrade that moves one
stops vbatch at import with ``DagsterInternalsMoved`` naming it (Dagster is pinned exactly in pyproject.toml for the
same reason)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import dagster


class DagsterInternalsMoved(ImportError):
    """A Dagster internal vbatch relies on is gone or renamed in this Dagster version."""


def _internal(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise DagsterInternalsMoved(f"Dagster {dagster.__version__} has no {module}.{name}, which vbatch's "
                                    "dagster_ext relies on: this vbatch does not support this Dagster version "
                                    f"({exc})") from exc


def _has(owner: Any, attribute: str, what: str) -> None:
    if not hasattr(owner, attribute):
        raise DagsterInternalsMoved(f"Dagster {dagster.__version__}: {what} has no {attribute}, which vbatch's "
                                    "dagster_ext patches or overrides")


check = importlib.import_module("dagster._check")
UserConfigSchema = _internal("dagster._config.config_schema", "UserConfigSchema")
RunLauncher = _internal("dagster._core.launcher.base", "RunLauncher")
LaunchRunContext = _internal("dagster._core.launcher.base", "LaunchRunContext")
CheckRunHealthResult = _internal("dagster._core.launcher.base", "CheckRunHealthResult")
WorkerStatus = _internal("dagster._core.launcher.base", "WorkerStatus")
ConfigurableClass = _internal("dagster._serdes", "ConfigurableClass")
ConfigurableClassData = _internal("dagster._serdes", "ConfigurableClassData")
unpack_value = _internal("dagster._serdes", "unpack_value")
ASSET_EVENTS = _internal("dagster._core.events", "ASSET_EVENTS")
SqliteEventLogStorage = _internal("dagster._core.storage.event_log", "SqliteEventLogStorage")
db_result = _internal("dagster._core.storage.sqlalchemy_compat", "db_result")
execute_run_command_body = _internal("dagster._cli.api", "_execute_run_command_body")
instance_concurrency_context = importlib.import_module("dagster._core.execution.plan.instance_concurrency_context")
InstanceRef = _internal("dagster._core.instance.ref", "InstanceRef")
ExecuteRunArgs = _internal("dagster._grpc.types", "ExecuteRunArgs")
capture_interrupts = _internal("dagster._utils.interrupts", "capture_interrupts")
storage_sql = importlib.import_module("dagster._core.storage.sql")

# What vbatch overrides or patches must still be there to override or patch.
_has(instance_concurrency_context, "MAX_CONCURRENCY_CLAIM_BLOCKED_INTERVAL",
     "dagster._core.execution.plan.instance_concurrency_context")
for _method in ("_initdb", "_connect", "store_event", "store_event_batch"):
    _has(SqliteEventLogStorage, _method, "SqliteEventLogStorage")
if "self._db_lock" not in inspect.getsource(SqliteEventLogStorage.__init__):  # an instance attribute vbatch takes
    raise DagsterInternalsMoved(f"Dagster {dagster.__version__}: SqliteEventLogStorage no longer sets _db_lock, "
                                "which vbatch's event log serialises its shard connections with")
_has(storage_sql, "get_alembic_config", "dagster._core.storage.sql")

# Dagster's own classes named in instance config (module paths, not imports: the instance loads them).
COMPUTE_LOG_MANAGER = {"module": "dagster._core.storage.local_compute_log_manager", "class": "LocalComputeLogManager"}
ARTIFACT_STORAGE = {"module": "dagster._core.storage.root", "class": "LocalArtifactStorage"}
for _spec in (COMPUTE_LOG_MANAGER, ARTIFACT_STORAGE):
    _internal(_spec["module"], _spec["class"])


def shorten_pool_claim_backoff(seconds: float) -> None:
    """A step blocked on a pool re-checks with a back-off Dagster grows to 15 s, so a freed slot could sit idle that
    long between queued steps; ``seconds`` keeps it busy for a few cheap queries."""
    instance_concurrency_context.MAX_CONCURRENCY_CLAIM_BLOCKED_INTERVAL = seconds
