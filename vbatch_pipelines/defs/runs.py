"""What the launch sensors of every domain share: which run states count as working, and how long a
record may wait for the API's own launch before a sensor launches it."""

from __future__ import annotations

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

LAUNCH_GRACE_S = 5  # the API launches at once; a sensor takes over what is still without a run after this

ACTIVE_RUN = {DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
              DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING}


def without_run(instance: DagsterInstance, tag: str, ids: list[str]) -> list[str]:
    """The ids that no Dagster run is tagged with (``tag`` = id): at most one run each."""
    return [i for i in ids if not instance.get_run_records(RunsFilter(tags={tag: i}), limit=1)]
