"""Launch a batch's Dagster run from outside Dagster (the REST API, the CLI).

The batch is already recorded; this adds its partition and launches ``batch_job`` through the Dagster
webserver's GraphQL API. If Dagster cannot be reached the batch stays recorded without a run and
``batch_launch_sensor`` launches it later, so nothing accepted is lost.
"""

from __future__ import annotations

from typing import Any

import httpx

from vbatch_pipelines.batch.service import update_batch
from vbatch_pipelines.store.db import Database

BATCH_JOB = "batch_job"
LOCATION_NAME = "vbatch"
REPOSITORY_NAME = "__repository__"
BATCH_ID_TAG = "vbatch/batch_id"

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


def run_tags(batch_id: str) -> dict[str, str]:
    return {"dagster/partition": batch_id, BATCH_ID_TAG: batch_id}


def launch_batch(db: Database, batch_id: str, dagster_url: str, *, timeout: float = 10.0) -> str:
    """Add the batch's partition, launch its run, record the run id; returns the run id."""
    selector = {"repositoryLocationName": LOCATION_NAME, "repositoryName": REPOSITORY_NAME}
    added = _graphql(dagster_url, _ADD_PARTITION, {"selector": selector, "name": "batches", "key": batch_id},
                     timeout)["addDynamicPartition"]
    if added["__typename"] not in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"):
        raise DagsterUnreachable(f"Could not add partition {batch_id}: {added.get('message', added['__typename'])}")
    params = {
        "selector": {**selector, "jobName": BATCH_JOB},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in run_tags(batch_id).items()]},
    }
    launched = _graphql(dagster_url, _LAUNCH_RUN, {"params": params}, timeout)["launchRun"]
    if launched["__typename"] != "LaunchRunSuccess":
        detail = launched.get("message") or launched.get("errors") or launched["__typename"]
        raise DagsterUnreachable(f"Dagster refused to launch {batch_id}: {detail}")
    run_id = launched["run"]["runId"]
    update_batch(db, batch_id, dagster_run_id=run_id)
    return run_id
