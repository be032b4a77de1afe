"""Launch a batch's or a fine-tuning job's Dagster run from outside Dagster (the REST API, the CLI).

The batch or job is already recorded; this adds its partition on the Dagster instance and launches its
Dagster job through the webserver's GraphQL API, which has the code location loaded (batches recorded
together share one run over their partition range). If Dagster cannot be reached it stays recorded
without a run and a sensor launches it later, so nothing accepted is lost.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

from vbatch_pipelines.batch.service import record_run
from vbatch_pipelines.dagster_api import DagsterUnreachable
from vbatch_pipelines.names import (
    BATCH_JOB,
    BATCH_LAUNCH_LOCK,
    EVAL_SCORE_JOB,
    FINE_TUNING_JOB,
    INSTALL_MODEL_JOB,
    LOCATION_NAME,
    MAX_BATCHES_PER_RUN,
    REPOSITORY_NAME,
    batch_run_tags,
    eval_run_tags,
    fine_tuning_run_tags,
    install_run_tags,
)
from vbatch_pipelines.partitions import (
    batch_partitions,
    fine_tune_partitions,
    model_partitions,
)
from vbatch_pipelines.store.db import Database

log = logging.getLogger("vbatch.launch")

_instance_lock = threading.Lock()
_instances: dict[str, Any] = {}


def dagster_instance():
    """This process's handle on the Dagster instance (``$DAGSTER_HOME``, which `vbatch up` sets for every
    service), opened once."""
    import os

    from dagster import DagsterInstance

    home = os.environ.get("DAGSTER_HOME", "")
    with _instance_lock:
        if home not in _instances:
            try:
                _instances[home] = DagsterInstance.get()
            except Exception as exc:  # noqa: BLE001 - DAGSTER_HOME unset, missing, or a bad dagster.yaml
                raise DagsterUnreachable(f"The Dagster instance (DAGSTER_HOME={home!r}) cannot be opened: {exc}") \
                    from exc
        return _instances[home]


def add_partitions(partitions: str, keys: list[str]) -> list[str]:
    """Add ``keys`` to the dynamic partitions ``partitions``, in this order, in one statement on the
    instance's storage (through the webserver it took a GraphQL mutation each); returns the keys that
    were new."""
    if not keys:
        return []
    try:
        instance = dagster_instance()
        existing = instance.get_existing_dynamic_partitions(partitions, keys)
        new = [key for key in keys if key not in existing]
        instance.add_dynamic_partitions(partitions, new)
    except DagsterUnreachable:
        raise
    except Exception as exc:  # noqa: BLE001 - its storage (PostgreSQL) is down: the sensor launches later
        raise DagsterUnreachable(f"Could not add partitions to {partitions}: {exc}") from exc
    return new


def launch_run(dagster_url: str, job: str, tags: dict[str, str], *, timeout: float = 10.0) -> str:
    """Launch ``job`` with ``tags`` (which say its partition or partition range) through Dagster's own GraphQL
    client; returns the run id. A webserver that does not answer, or refuses, is DagsterUnreachable (the run is
    launched later)."""
    parts = urlsplit(dagster_url)
    try:
        client = DagsterGraphQLClient(parts.hostname or "127.0.0.1", port_number=parts.port,
                                      use_https=parts.scheme == "https", timeout=max(1, math.ceil(timeout)),
                                      path_prefix=parts.path.rstrip("/"))
        return client.submit_job_execution(job, repository_location_name=LOCATION_NAME,
                                           repository_name=REPOSITORY_NAME, tags=tags)
    except DagsterGraphQLClientError as exc:
        # a refusal names its kind (RunConflict, JobNotFoundError, ...) and says why; a failed call, its cause
        detail = f"{exc.args[0]}: {exc.body}" if exc.body is not None else str(exc.__cause__ or exc).splitlines()[0]
        raise DagsterUnreachable(f"Dagster at {dagster_url} did not launch {job} ({tags}): {detail}") from exc


def launch_partition(dagster_url: str, job: str, partitions: str, key: str, tags: dict[str, str], *,
                     timeout: float = 10.0) -> str:
    """Add ``key`` to the dynamic partitions ``partitions`` and launch ``job`` for it; returns the run id."""
    add_partitions(partitions, [key])
    return launch_run(dagster_url, job, tags, timeout=timeout)


def launch_batches(db: Database, dagster_url: str, include: frozenset[str] = frozenset(), *,
                   timeout: float = 120.0) -> dict[str, list[str]]:
    """Launch every validated batch recorded without a run, and the batches in ``include`` (files too large
    for the API to validate, which ``batch_input`` validates); returns {run id: batch ids}.

    Validated batches are launched together, up to ``MAX_BATCHES_PER_RUN`` per run over their partition
    range: one run start for all of them, and one step that runs them side by side on the engine. A batch
    still validating gets a run of its own. Everything happens under the lock every batch launcher takes
    (API processes, the launch sensor), so the partitions are added in order and a range holds exactly
    the batches launched with it. What a failed launch leaves, the next launch or the launch sensor picks
    up (a batch whose partition was added already then gets a run of its own)."""
    launched: dict[str, list[str]] = {}
    began = time.monotonic()
    with db.lock(BATCH_LAUNCH_LOCK):
        locked = time.monotonic()
        waiting = _with_creates_in_flight(db, include)
        validated = [b.id for b in waiting if b.status == "in_progress"]
        validating = [b.id for b in waiting if b.status != "in_progress" and b.id in include]
        if not validated and not validating:
            return launched
        gathered = time.monotonic()
        new = set(add_partitions(batch_partitions.name, validated + validating))
        added = time.monotonic()
        # New keys were appended in this order, so the new validated ones form one contiguous range.
        grouped = [key for key in validated if key in new]
        groups = [grouped[i:i + MAX_BATCHES_PER_RUN] for i in range(0, len(grouped), MAX_BATCHES_PER_RUN)]
        groups += [[key] for key in validated + validating if key not in grouped]
        for group in groups:
            run_id = launch_run(dagster_url, BATCH_JOB, batch_run_tags(group), timeout=timeout)
            record_run(db, group, run_id)
            launched[run_id] = group
    log.info("launched %d run(s) for %d batch(es) in %.3fs (lock %.3fs, gathering %.3fs, partitions %.3fs, runs %.3fs)",
             len(launched), sum(map(len, launched.values())), time.monotonic() - began, locked - began,
             gathered - locked, added - gathered, time.monotonic() - added)
    return launched


class BatchLauncher:
    """Launches the batches an API process records, from a thread of its own: a create returns as soon as
    its batch is recorded (and validated), and a burst of creates shares the launches that run meanwhile.
    Nothing accepted is lost if a launch fails: the next one, or the launch sensor, picks it up."""

    def __init__(self, db: Database, dagster_url: str, *, warm: bool = False):
        self.db, self.dagster_url = db, dagster_url
        self._wake = threading.Event()
        self._stopping = False
        self._include: set[str] = set()
        self._lock = threading.Lock()
        self._warm = warm
        self._thread = threading.Thread(target=self._loop, name="batch-launcher", daemon=True)
        self._thread.start()

    def _warm_up(self) -> None:
        """Open the Dagster instance now (``warm``: `vbatch up` marks its API so), not at the first launch:
        the first batch would pay its storage set-up, a few tenths of a second."""
        try:
            dagster_instance()
        except DagsterUnreachable as exc:  # the first launch tries again, and says why
            log.info("the Dagster instance is not open yet: %s", exc)

    def launch(self, batch_id: str, *, validated: bool) -> None:
        if not validated:
            with self._lock:
                self._include.add(batch_id)
        self._wake.set()

    def _loop(self) -> None:
        if self._warm:
            self._warm_up()
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            with self._lock:
                include, self._include = frozenset(self._include), set()
            try:
                launch_batches(self.db, self.dagster_url, include)
            except DagsterUnreachable as exc:  # batch_launch_sensor launches them once Dagster is back
                log.warning("batch launch deferred to the launch sensor: %s", exc)
            except Exception:  # noqa: BLE001 - the thread must live on; the sensor covers what it missed
                log.exception("batch launch failed; the launch sensor will retry")

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)


def _with_creates_in_flight(db: Database, include: frozenset[str], quiet_s: float = 0.05,
                            max_s: float = 1.0) -> list:
    """The batches waiting for a run, once a burst of creates has settled: until no batch was recorded for
    ``quiet_s`` and none recorded in the last second is still being validated by an API process (at most
    ``max_s``). A burst (one client creating many batches, spread over the API's workers) then shares one
    run instead of the first create going alone and the rest queueing behind its launch; a lone create
    waits ``quiet_s``."""
    from vbatch_pipelines.batch.service import now, waiting_for_run

    started = time.monotonic()
    seen: set[str] | None = None
    changed = started
    while True:
        waiting = waiting_for_run(db)
        ids = {b.id for b in waiting}
        if ids != seen:
            seen, changed = ids, time.monotonic()
        validating = any(b.status == "validating" and b.id not in include and b.created_at >= now() - 1
                         for b in waiting)
        if time.monotonic() - started >= max_s or (not validating and time.monotonic() - changed >= quiet_s):
            return waiting
        time.sleep(0.02)


def launch_batch(db: Database, batch_id: str, dagster_url: str, *, timeout: float = 10.0) -> str:
    """Launch a run for this one batch and record its id; returns the run id."""
    with db.lock(BATCH_LAUNCH_LOCK):
        add_partitions(batch_partitions.name, [batch_id])
        run_id = launch_run(dagster_url, BATCH_JOB, batch_run_tags([batch_id]), timeout=timeout)
        record_run(db, [batch_id], run_id)
    return run_id


def launch_fine_tune(db: Database, job_id: str, dagster_url: str, *, timeout: float = 10.0) -> str:
    from vbatch_pipelines.fine_tuning.service import update_job

    run_id = launch_partition(dagster_url, FINE_TUNING_JOB, fine_tune_partitions.name, job_id,
                              fine_tuning_run_tags(job_id), timeout=timeout)
    update_job(db, job_id, dagster_run_id=run_id)
    return run_id


def launch_eval_run(db: Database, run_id: str, eval_id: str, model: str, dagster_url: str, *,
                    timeout: float = 10.0) -> str:
    """Launch the (set, model) partition's run for a recorded eval run and record its Dagster run id."""
    from vbatch_pipelines.evals import update_run
    from vbatch_pipelines.partitions import eval_model_partitions, eval_set_partitions

    add_partitions(eval_set_partitions.name, [eval_id])
    add_partitions(eval_model_partitions.name, [model])
    dagster_run_id = launch_run(dagster_url, EVAL_SCORE_JOB, eval_run_tags(run_id, eval_id, model), timeout=timeout)
    update_run(db, run_id, dagster_run_id=dagster_run_id)
    return dagster_run_id


def launch_install(model_id: str, dagster_url: str, *, timeout: float = 10.0) -> str:
    return launch_partition(dagster_url, INSTALL_MODEL_JOB, model_partitions.name, model_id,
                            install_run_tags(model_id), timeout=timeout)
