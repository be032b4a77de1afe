"""Launch a batch's or a fine-tuning job's Dagster run from outside Dagster (the REST API, the CLI).

The batch or job is already recorded; this adds its partition and launches its Dagster job through the
webserver's GraphQL API. If Dagster cannot be reached it stays recorded without a run and a sensor
launches it later, so nothing accepted is lost.
"""

from __future__ import annotations

from typing import Any

import httpx

from vbatch_pipelines.batch.service import update_batch
from vbatch_pipelines.names import (
    BATCH_JOB,
    FINE_TUNING_JOB,
    INSTALL_MODEL_JOB,
    LOCATION_NAME,
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

_ADD_PARTITION = """
mutation AddPartition($selector: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $selector, partitionsDefName: $name, partitionKey: $key) {
    __typename
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}
"""

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


def launch_partition(dagster_url: str, job: str, partitions: str, key: str, tags: dict[str, str], *,
                     timeout: float = 10.0) -> str:
    """Add ``key`` to the dynamic partitions ``partitions`` and launch ``job`` for it; returns the run id."""
    selector = {"repositoryLocationName": LOCATION_NAME, "repositoryName": REPOSITORY_NAME}
    added = _graphql(dagster_url, _ADD_PARTITION, {"selector": selector, "name": partitions, "key": key},
                     timeout)["addDynamicPartition"]
    if added["__typename"] not in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"):
        raise DagsterUnreachable(f"Could not add partition {key}: {added.get('message', added['__typename'])}")
    params = {
        "selector": {**selector, "jobName": job},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }
    launched = _graphql(dagster_url, _LAUNCH_RUN, {"params": params}, timeout)["launchRun"]
    if launched["__typename"] != "LaunchRunSuccess":
        detail = launched.get("message") or launched.get("errors") or launched["__typename"]
        raise DagsterUnreachable(f"Dagster refused to launch {key}: {detail}")
    return launched["run"]["runId"]


def launch_batch(db: Database, batch_id: str, dagster_url: str, *, timeout: float = 10.0) -> str:
    """Launch the batch's run and record its id; returns the run id."""
    run_id = launch_partition(dagster_url, BATCH_JOB, batch_partitions.name, batch_id, batch_run_tags(batch_id),
                              timeout=timeout)
    update_batch(db, batch_id, dagster_run_id=run_id)
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
