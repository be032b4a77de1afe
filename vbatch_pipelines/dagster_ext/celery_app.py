"""The Celery app a node's worker runs (``celery -A vbatch_pipelines.dagster_ext.celery_app worker``, started by
`vbatch worker`): dagster-celery's own ``execute_job`` and ``resume_job`` tasks on the app the cluster's run
launcher sends to (the same broker, backend and queues), in a process that has vbatch's code location loaded
before the pool forks, so each run starts warm, as in single-machine mode.

Each run records who executes it (node, Celery worker hostname, pool process pid) as run tags and an engine
event as it starts; a pool process dies with its worker, so a node that dies leaves nothing running.
"""

from __future__ import annotations

import os
import signal

import pyarrow.parquet  # noqa: F401 - imported before the fork, as the warm run workers do (batch_input's Parquet)
from celery import signals
from dagster import DagsterInstance
from dagster_celery.config import TASK_EXECUTE_JOB_NAME, TASK_RESUME_JOB_NAME
from dagster_celery.tasks import create_execute_job_task, create_resume_job_task

from vbatch_pipelines.cluster.config import DEFAULT_QUEUE, check_cluster
from vbatch_pipelines.dagster_ext._compat import shorten_pool_claim_backoff, unpack_value
from vbatch_pipelines.dagster_ext.cluster_launcher import ClusterRunLauncher
from vbatch_pipelines.dagster_ext.run_launcher import POOL_CLAIM_MAX_INTERVAL_S
from vbatch_pipelines.definitions import SETTINGS  # the code location, loaded once here
from vbatch_pipelines.names import CELERY_WORKER_PID_TAG, CELERY_WORKER_TAG, NODE_TAG
from vbatch_pipelines.processes import die_with_parent

check_cluster(SETTINGS, "vbatch worker")
# A step blocked on a pool re-checks at least every 2 s (Dagster backs off to 15 s), as in the warm run workers.
shorten_pool_claim_backoff(POOL_CLAIM_MAX_INTERVAL_S)

app = ClusterRunLauncher(DEFAULT_QUEUE, broker=SETTINGS.cluster.broker_url, backend=SETTINGS.cluster.broker_url).celery
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)


@signals.worker_process_init.connect
def _die_with_worker(**_) -> None:
    """A pool process gets SIGKILL when its worker goes (even by kill -9): a run never outlives the worker that
    run monitoring asks about, so the re-executed run is the only one working on its batch."""
    die_with_parent(signal.SIGKILL)


@signals.task_prerun.connect
def _record_worker(task_id=None, task=None, kwargs=None, **_) -> None:
    if task is None or task.name not in (TASK_EXECUTE_JOB_NAME, TASK_RESUME_JOB_NAME):
        return
    packed = (kwargs or {}).get("execute_job_args_packed") or (kwargs or {}).get("resume_job_args_packed")
    if packed is None:
        return
    run_id = unpack_value(packed).run_id
    where = {NODE_TAG: SETTINGS.engine.node or "", CELERY_WORKER_TAG: task.request.hostname or "",
             CELERY_WORKER_PID_TAG: str(os.getpid())}
    with DagsterInstance.get() as instance:
        instance.add_run_tags(run_id, where)
        run = instance.get_run_by_id(run_id)
        if run is not None:
            instance.report_engine_event(f"Executing on node {where[NODE_TAG]}: Celery worker "
                                         f"{where[CELERY_WORKER_TAG]}, pid {where[CELERY_WORKER_PID_TAG]} "
                                         f"(task {task_id})", run)
