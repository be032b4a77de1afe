"""The Dagster webserver's GraphQL API, as vbatch's launchers and `vbatch up` call it: small enough for the
supervisor to import (no Dagster, no metadata DB)."""

from __future__ import annotations

import logging
from typing import Any

import httpx

from vbatch_pipelines.names import BATCH_JOB, LOCATION_NAME, REPOSITORY_NAME
from vbatch_pipelines.net import local_http

log = logging.getLogger("vbatch.launch")


class DagsterUnreachable(RuntimeError):
    """The webserver did not answer or refused the launch; the sensor will launch the batch later."""


def graphql(url: str, query: str, variables: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        response = local_http().post(f"{url.rstrip('/')}/graphql",
                                     json={"query": query, "variables": variables}, timeout=timeout)
        response.raise_for_status()
        payload = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise DagsterUnreachable(f"Dagster at {url} is unreachable: {exc}") from exc
    if payload.get("errors"):
        raise DagsterUnreachable(f"Dagster GraphQL error: {payload['errors'][0].get('message')}")
    return payload["data"]


_WARM_UP = """
query WarmUp($selector: PipelineSelector!) {
  pipelineOrError(params: $selector) { __typename }
  executionPlanOrError(pipeline: $selector, mode: "default", runConfigData: {}) { __typename }
  instance { runLauncher { name } }
}
"""


def warm_up_runs(dagster_url: str, timeout: float = 150.0) -> bool:
    """Have the webserver load the batch job, have its code server build the job's execution plan (as each
    launch does), and make its run launcher, which starts its run workers and answers once one is warm
    (``WarmRunLauncher.register_instance``): what the first launch would pay, paid before "vbatch is up".
    False when the webserver did not answer in time (the first batch then pays it)."""
    selector = {"pipelineName": BATCH_JOB, "repositoryName": REPOSITORY_NAME,
                "repositoryLocationName": LOCATION_NAME}
    try:
        data = graphql(dagster_url, _WARM_UP, {"selector": selector}, timeout)
    except DagsterUnreachable as exc:
        log.warning("could not warm the run workers up: %s", exc)
        return False
    answers = (data["pipelineOrError"]["__typename"], data["executionPlanOrError"]["__typename"])
    if answers != ("Pipeline", "ExecutionPlan"):
        log.warning("could not warm %s up: the webserver answered %s", BATCH_JOB, " and ".join(answers))
        return False
    return True
