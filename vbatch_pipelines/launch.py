"""Launch a batch's or a fine-tuning job's Dagster run from outside Dagster (the REST API, the CLI).

The batch or job is already recorded; this adds its partition and launches its Dagster job through the
webserver's GraphQL API (batches recorded together share one run over their partition range). If Dagster
cannot be reached it stays recorded without a run and a sensor launches it later, so nothing accepted is
lost.
"""

from __future__ import annotations

from typing import Any

import httpx

from vbatch_pipelines.batch.service import record_run
from vbatch_pipelines.names import (
    BATCH_JOB,
    BATCH_LAUNCH_LOCK,
    FINE_TUNING_JOB,
    INSTALL_MODEL_JOB,
    LOCATION_NAME,
    MAX_BATCHES_PER_RUN,
    REPOSITORY_NAME,
    batch_run_tags,
    fine_tuning_run_tags,
    install_run_tags,
)
from vbatch_pipelines.partitions import (
    batch_partitions,
    fine_tune_partitions,
    model_partitions,
)
from vbatch_pipelines.store.db import Database

_LAUNCH_RUN = """
mutation LaunchRun($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
    ... on RunConflict { message }
    ... on UnauthorizedError { message }
  }
}
"""


class DagsterUnreachable(RuntimeError):
    """The webserver did not answer or refused the launch; the sensor will launch the batch later."""


def _graphql(url: str, query: str, variables: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        response = httpx.post(f"{url.rstrip('/')}/graphql", json={"query": query, "variables": variables},
                              timeout=timeout)
        response.raise_for_status()
        payload = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise DagsterUnreachable(f"Dagster at {url} is unreachable: {exc}") from exc
    if payload.get("errors"):
        raise DagsterUnreachable(f"Dagster GraphQL error: {payload['errors'][0].get('message')}")
    return payload["data"]


def add_partitions(dagster_url: str, partitions: str, keys: list[str], *, timeout: float = 10.0) -> list[str]:
    """Add ``keys`` to the dynamic partitions ``partitions``, in this order, in one request (GraphQL runs a
    request's mutations one after another); returns the keys that were new."""
    if not keys:
        return []
    selector = {"repositoryLocationName": LOCATION_NAME, "repositoryName": REPOSITORY_NAME}
    fields = "\n".join(
        f"a{i}: addDynamicPartition(repositorySelector: $selector, partitionsDefName: $name, partitionKey: $k{i}) "
        "{ __typename ... on PythonError { message } ... on UnauthorizedError { message } }"
        for i in range(len(keys)))
    arguments = ", ".join(f"$k{i}: String!" for i in range(len(keys)))
    query = f"mutation AddPartitions($selector: RepositorySelector!, $name: String!, {arguments}) {{ {fields} }}"
    data = _graphql(dagster_url, query, {"selector": selector, "name": partitions,
                                         **{f"k{i}": key for i, key in enumerate(keys)}}, timeout)
    new = []
    for i, key in enumerate(keys):
        added = data[f"a{i}"]
        if added["__typename"] == "AddDynamicPartitionSuccess":
            new.append(key)
        elif added["__typename"] != "DuplicateDynamicPartitionError":
            raise DagsterUnreachable(f"Could not add partition {key}: {added.get('message', added['__typename'])}")
    return new


def launch_run(dagster_url: str, job: str, tags: dict[str, str], *, timeout: float = 10.0) -> str:
    """Launch ``job`` with ``tags`` (which say its partition or partition range); returns the run id."""
    selector = {"repositoryLocationName": LOCATION_NAME, "repositoryName": REPOSITORY_NAME}
    params = {
        "selector": {**selector, "jobName": job},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }
    launched = _graphql(dagster_url, _LAUNCH_RUN, {"params": params}, timeout)["launchRun"]
    if launched["__typename"] != "LaunchRunSuccess":
        detail = launched.get("message") or launched.get("errors") or launched["__typename"]
        raise DagsterUnreachable(f"Dagster refused to launch {job} ({tags}): {detail}")
    return launched["run"]["runId"]


def launch_partition(dagster_url: str, job: str, partitions: str, key: str, tags: dict[str, str], *,
                     timeout: float = 10.0) -> str:
    """Add ``key`` to the dynamic partitions ``partitions`` and launch ``job`` for it; returns the run id."""
    add_partitions(dagster_url, partitions, [key], timeout=timeout)
    return launch_run(dagster_url, job, tags, timeout=timeout)


def launch_batches(db: Database, dagster_url: str, batch_id: str, *, timeout: float = 10.0) -> dict[str, list[str]]:
    """Launch ``batch_id`` and every other validated batch recorded without a run; returns {run id: batch ids}.

    Validated batches are launched together, up to ``MAX_BATCHES_PER_RUN`` per run over their partition
    range: one run start for all of them, and one step that runs them side by side on the engine.
    ``batch_id`` still ``validating`` (a file too large for the API to validate) gets a run of its own;
    other batches still validating belong to creates in flight, which launch them when done. Everything
    happens under the lock every batch launcher takes (API processes, the launch sensor), so the partitions
    are added in order and a range holds exactly the batches launched with it; a caller that waited for the
    lock usually finds its batch launched by the one before. What a failed launch leaves, the next launch
    or the launch sensor picks up."""
    from vbatch_pipelines.batch.service import waiting_for_run

    launched: dict[str, list[str]] = {}
    with db.lock(BATCH_LAUNCH_LOCK):
        waiting = waiting_for_run(db)
        validated = [b.id for b in waiting if b.status == "in_progress"]
        validating = [b.id for b in waiting if b.status != "in_progress" and b.id == batch_id]
        if not validated and not validating:
            return launched
        new = set(add_partitions(dagster_url, batch_partitions.name, validated + validating, timeout=timeout))
        # New keys were appended in this order, so the new validated ones form one contiguous range.
        grouped = [key for key in validated if key in new]
        groups = [grouped[i:i + MAX_BATCHES_PER_RUN] for i in range(0, len(grouped), MAX_BATCHES_PER_RUN)]
        groups += [[key] for key in validated + validating if key not in grouped]
        for group in groups:
            run_id = launch_run(dagster_url, BATCH_JOB, batch_run_tags(group), timeout=timeout)
            record_run(db, group, run_id)
            launched[run_id] = group
    return launched


def launch_batch(db: Database, batch_id: str, dagster_url: str, *, timeout: float = 10.0) -> str:
    """Launch a run for this one batch and record its id; returns the run id."""
    with db.lock(BATCH_LAUNCH_LOCK):
        add_partitions(dagster_url, batch_partitions.name, [batch_id], timeout=timeout)
        run_id = launch_run(dagster_url, BATCH_JOB, batch_run_tags([batch_id]), timeout=timeout)
        record_run(db, [batch_id], run_id)
    return run_id


def launch_fine_tune(db: Database, job_id: str, dagster_url: str, *, timeout: float = 10.0) -> str:
    from vbatch_pipelines.fine_tuning.service import update_job

    run_id = launch_partition(dagster_url, FINE_TUNING_JOB, fine_tune_partitions.name, job_id,
                              fine_tuning_run_tags(job_id), timeout=timeout)
    update_job(db, job_id, dagster_run_id=run_id)
    return run_id


def launch_install(model_id: str, dagster_url: str, *, timeout: float = 10.0) -> str:
    return launch_partition(dagster_url, INSTALL_MODEL_JOB, model_partitions.name, model_id,
                            install_run_tags(model_id), timeout=timeout)
