"""Cluster mode's run launcher: dagster-celery's ``CeleryRunLauncher`` with two things vbatch needs.

- Routing: a run with a step in the ``gpu`` pool goes to the ``gpu`` queue, which only nodes with GPUs consume;
  any other run to the default queue. The queue is written on the run as dagster-celery's own
  ``dagster-celery/queue`` tag (a tag set at launch, by hand or on the job, wins), so runs launched from the UI,
  sensors, schedules and run retries are routed alike.
- A real health check for run monitoring. The stock one reads the task's state from the result backend, which
  says ``STARTED`` for ever when the node running the task dies (nobody is left to write anything else). Here a
  started task's worker (its hostname, from the state Celery stored) is asked whether it still has the task;
  a worker that does not answer, or answers without it (restarted), for ``MISSING_FOR_S`` is reported failed,
  so run monitoring fails the run, frees its pool slots, and run retries re-execute it on another worker.
- Terminate as in single-machine mode: the run is marked canceling and its pool process gets SIGINT, which
  Dagster's execution turns into a clean cancel (the stock SIGTERM kills the process: the run would then be
  failed, and retried, instead of canceled).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from dagster import DagsterRun, Field, StringSource
from dagster_celery.launcher import CeleryRunLauncher
from dagster_celery.tags import DAGSTER_CELERY_TASK_ID_TAG

from vbatch_pipelines.cluster.config import GPU_QUEUE
from vbatch_pipelines.dagster_ext._compat import (
    CheckRunHealthResult,
    ConfigurableClassData,
    LaunchRunContext,
    WorkerStatus,
)
from vbatch_pipelines.instance import GPU_POOL
from vbatch_pipelines.names import CELERY_QUEUE_TAG

# Celery settings both sides share (the launcher's app and the workers' app are built alike).
CELERY_SETTINGS = {
    "broker_connection_retry_on_startup": True,
    "result_expires": 7 * 24 * 3600,  # a task's state outlives any run: run monitoring reads it
    "worker_disable_prefetch": True,  # Redis: a worker takes a task only when one of its processes is free
}
ASK_TIMEOUT_S = 3.0
MISSING_FOR_S = 10.0  # a busy worker may miss one question; a dead one misses every question


class ClusterRunLauncher(CeleryRunLauncher):
    """Runs as Celery tasks; GPU-bound runs on the ``gpu`` queue; dead workers reported to run monitoring."""

    def __init__(self, default_queue: str, broker: str | None = None, backend: str | None = None,
                 include: list[str] | None = None, config_source: dict | None = None,
                 inst_data: ConfigurableClassData | None = None, gpu_queue: str = GPU_QUEUE,
                 gpu_pools: Sequence[str] = (GPU_POOL,)):
        self.gpu_queue = gpu_queue
        self.gpu_pools = frozenset(gpu_pools)
        self._missing_since: dict[str, float] = {}
        super().__init__(default_queue, broker=broker, backend=backend, include=include,
                         config_source={**CELERY_SETTINGS, **(config_source or {})}, inst_data=inst_data)

    @classmethod
    def config_type(cls):
        return {
            **CeleryRunLauncher.config_type(),
            "gpu_queue": Field(StringSource, is_required=False, default_value=GPU_QUEUE,
                               description="The queue of runs with a step in one of gpu_pools."),
            "gpu_pools": Field([str], is_required=False, default_value=[GPU_POOL],
                               description="Pools whose steps need a GPU."),
        }

    def queue_for(self, run: DagsterRun) -> str:
        """The run's queue: its tag if it has one, else ``gpu_queue`` when a step it executes is in a GPU pool."""
        if run.tags.get(CELERY_QUEUE_TAG):
            return run.tags[CELERY_QUEUE_TAG]
        if run.execution_plan_snapshot_id:
            plan = self._instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
            chosen = set(plan.step_keys_to_execute or ())
            if any(step.pool in self.gpu_pools for step in plan.steps if not chosen or step.key in chosen):
                return self.gpu_queue
        return self.default_queue

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        queue = self.queue_for(run)
        if run.tags.get(CELERY_QUEUE_TAG) != queue:
            self._instance.add_run_tags(run.run_id, {CELERY_QUEUE_TAG: queue})
            run = self._instance.get_run_by_id(run.run_id) or run
        super().launch_run(LaunchRunContext(dagster_run=run, workspace=context.workspace))

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        task_id = run.tags.get(DAGSTER_CELERY_TASK_ID_TAG) if run is not None else None
        if run is None or run.is_finished or not task_id:
            return False
        self._instance.report_run_canceling(run)
        self.celery.control.revoke(task_id, terminate=True, signal="SIGINT")
        return True

    def _worker_has(self, hostname: str, task_id: str) -> bool:
        inspect = self.celery.control.inspect(destination=[hostname], timeout=ASK_TIMEOUT_S, limit=1)
        replies = inspect.query_task(task_id) or {}
        return task_id in (replies.get(hostname) or {})

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        task_id = run.tags.get(DAGSTER_CELERY_TASK_ID_TAG)
        if not task_id:
            return CheckRunHealthResult(WorkerStatus.NOT_FOUND, "the run has no Celery task")
        result = self.celery.AsyncResult(task_id)
        info = result.info if result.state == "STARTED" else None
        if not isinstance(info, dict) or not info.get("hostname"):
            self._missing_since.pop(run.run_id, None)
            return super().check_run_worker_health(run)
        hostname = info["hostname"]
        if self._worker_has(hostname, task_id):
            self._missing_since.pop(run.run_id, None)
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=f"{hostname} pid {info.get('pid')}")
        if self.celery.AsyncResult(task_id).state != "STARTED":  # it ended between the two questions
            self._missing_since.pop(run.run_id, None)
            return super().check_run_worker_health(run)
        since = self._missing_since.setdefault(run.run_id, time.monotonic())
        if time.monotonic() - since < MISSING_FOR_S:
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=f"{hostname} (not answering)")
        self._missing_since.pop(run.run_id, None)
        return CheckRunHealthResult(WorkerStatus.FAILED,
                                    f"Celery worker {hostname} (pid {info.get('pid')}) no longer runs this run's task "
                                    f"(no answer, or restarted, for {MISSING_FOR_S:.0f}s): its node or worker died")
