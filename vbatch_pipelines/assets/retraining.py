"""Retraining as an asset: each materialization records a fine-tuning job on the latest gold stars.
It runs when enough new gold stars arrived (an automation condition), on the retraining schedule, or
from the UI's materialize button; the job deploys only through the configured gate."""

from dagster import (
    AssetExecutionContext,
    AutomationCondition,
    AutomationResult,
    Failure,
    MaterializeResult,
    asset,
)

from resources import MetadataDB
from vbatch_pipelines.assets.curation import gold_star_dataset
from vbatch_pipelines.fine_tuning.retraining import record_retraining, retraining_state
from vbatch_pipelines.fine_tuning.service import FineTuningError
from vbatch_pipelines.settings import load_settings
from vbatch_pipelines.store.db import get_database


class NewGoldStars(AutomationCondition):
    """At least ``minimum`` gold stars arrived since the dataset the last fine-tune trained on, in a dataset
    version this condition has not fired for (its cursor): once per N, and never twice for one version."""

    def __init__(self, minimum: int):
        self.minimum = minimum

    @property
    def name(self) -> str:
        return f"new_gold_stars(>={self.minimum})"

    @property
    def description(self) -> str:
        return f"at least {self.minimum} new gold stars since the last fine-tune"

    def evaluate(self, context):
        state = retraining_state(get_database(load_settings().database_url))
        fire = state.new_gold_stars >= self.minimum and state.latest_dataset != context.cursor
        return AutomationResult(context, context.candidate_subset if fire else context.get_empty_subset(),
                                cursor=state.latest_dataset if fire else context.cursor)


def _trigger(context: AssetExecutionContext) -> str:
    tags = context.run.tags
    if "dagster/schedule_name" in tags:
        return "schedule"
    if "dagster/sensor_name" in tags:
        return "automation"
    return "manual"


@asset(
    deps=[gold_star_dataset],
    group_name="models",
    kinds={"python"},
    automation_condition=NewGoldStars(load_settings().retrain_min_gold_stars) & ~AutomationCondition.in_progress(),
)
def retraining_request(context: AssetExecutionContext, metadata_db: MetadataDB) -> MaterializeResult:
    """A fine-tuning job of the default model on the latest gold-star dataset (launched by
    fine_tuning_sensor), deployed only if its comparison passes the gate (VBATCH_DEPLOY_GATE)."""
    settings = load_settings()
    db = metadata_db.db
    state = retraining_state(db)
    try:
        job = record_retraining(db, settings, _trigger(context))
    except FineTuningError as exc:
        raise Failure(f"Cannot retrain: {exc}") from exc
    context.log.info(f"Recorded {job.id}: {job.model} on {state.latest_dataset} "
                     f"({state.new_gold_stars} new gold stars since {state.trained_on or 'no earlier fine-tune'})")
    return MaterializeResult(metadata={
        "fine_tuning_job": job.id, "base_model": job.model, "dataset_version": state.latest_dataset,
        "previous_dataset_version": state.trained_on or "", "new_gold_stars": state.new_gold_stars,
        "trigger": job.trigger, "deploy_gate": job.deploy,
    })
