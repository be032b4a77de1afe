"""Retraining: each materialization of ``retraining_request`` records a fine-tuning job on the latest gold
stars (launched by fine_tuning_sensor), deployed only through the policy's gate. It runs when enough new gold
stars arrived (an automation condition and its sensor), on the retraining schedule, or from the UI's
materialize button. Its thresholds are needed when the definitions load, so this domain is built from the
``RetrainingPolicy`` resource by ``build_defs``."""

import warnings

from dagster import (
    AssetExecutionContext,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    AutomationResult,
    BetaWarning,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    Failure,
    MaterializeResult,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    asset,
    define_asset_job,
    in_process_executor,
    schedule,
)

from resources import FileStore, MetadataDB, ModelRegistry, RetrainingPolicy, Trainer
from vbatch_pipelines.defs.curation import gold_star_dataset
from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.fine_tuning.retraining import record_retraining, retraining_state
from vbatch_pipelines.names import (
    RETRAINING_JOB,
    SCHEDULE_NAME_TAG,
    SENSOR_NAME_TAG,
    TRIGGER_TAG,
)
from vbatch_pipelines.store.db import get_database


class NewGoldStars(AutomationCondition):
    """At least ``minimum`` gold stars arrived since the dataset the last fine-tune trained on, in a dataset
    version this condition has not fired for (its cursor): once per N, and never twice for one version.
    It runs in the code server, outside any run, so it is given the metadata DB's URL itself."""

    def __init__(self, minimum: int, database_url: str):
        self.minimum = minimum
        self._database_url = database_url

    @property
    def name(self) -> str:
        return f"new_gold_stars(>={self.minimum})"

    @property
    def description(self) -> str:
        return f"at least {self.minimum} new gold stars since the last fine-tune"

    def evaluate(self, context):
        state = retraining_state(get_database(self._database_url))
        fire = state.new_gold_stars >= self.minimum and state.latest_dataset != context.cursor
        return AutomationResult(context, context.candidate_subset if fire else context.get_empty_subset(),
                                cursor=state.latest_dataset if fire else context.cursor)


def _trigger(context: AssetExecutionContext) -> str:
    tags = context.run.tags
    if SCHEDULE_NAME_TAG in tags:
        return "schedule"
    if SENSOR_NAME_TAG in tags:
        return "automation"
    return "manual"


def build_defs(policy: RetrainingPolicy, database_url: str, cron: str | None) -> Definitions:
    """The retraining domain for this policy (its gold-star threshold), metadata DB and schedule (None: no
    schedule)."""

    @asset(
        deps=[gold_star_dataset],
        group_name="models",
        kinds={"python"},
        automation_condition=NewGoldStars(policy.min_gold_stars, database_url) & ~AutomationCondition.in_progress(),
    )
    def retraining_request(context: AssetExecutionContext, metadata_db: MetadataDB, file_store: FileStore,
                           model_registry: ModelRegistry, trainer: Trainer,
                           retraining_policy: RetrainingPolicy) -> MaterializeResult:
        """A fine-tuning job of the policy's model on the latest gold-star dataset (launched by
        fine_tuning_sensor), deployed only if its comparison passes the gate (VBATCH_DEPLOY_GATE)."""
        db = metadata_db.db
        state = retraining_state(db)
        try:
            job = record_retraining(db, model_registry, file_store, trainer, retraining_policy, _trigger(context))
        except VbatchError as exc:
            raise Failure(f"Cannot retrain: {exc}") from exc
        context.log.info(f"Recorded {job.id}: {job.model} on {state.latest_dataset} "
                         f"({state.new_gold_stars} new gold stars since {state.trained_on or 'no earlier fine-tune'})")
        return MaterializeResult(metadata={
            "fine_tuning_job": job.id, "base_model": job.model, "dataset_version": state.latest_dataset,
            "previous_dataset_version": state.trained_on or "", "new_gold_stars": state.new_gold_stars,
            "trigger": job.trigger, "deploy_gate": job.deploy,
        })

    retraining_job = define_asset_job(
        RETRAINING_JOB,
        selection=AssetSelection.assets(retraining_request),
        executor_def=in_process_executor,
        description="Record a fine-tuning job on the latest gold stars (the retraining schedule runs it).",
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)  # use_user_code_server: the condition reads vbatch's DB
        retraining_automation = AutomationConditionSensorDefinition(
            "retraining_automation",
            target=AssetSelection.assets(retraining_request),
            use_user_code_server=True,
            default_status=DefaultSensorStatus.RUNNING,
            minimum_interval_seconds=30,
        )
    schedules = [_retraining_schedule(cron, retraining_job)] if cron else []
    return Definitions(assets=[retraining_request], jobs=[retraining_job], sensors=[retraining_automation],
                       schedules=schedules)


def _retraining_schedule(cron: str, job):
    @schedule(cron_schedule=cron, job=job, default_status=DefaultScheduleStatus.RUNNING, name="retraining_schedule")
    def retraining_schedule(context: ScheduleEvaluationContext, metadata_db: MetadataDB, trainer: Trainer):
        """Retrain on the schedule (VBATCH_RETRAIN_CRON) when any gold star arrived since the last fine-tune."""
        state = retraining_state(metadata_db.db)
        if not state.new_gold_stars:
            return SkipReason(f"No new gold stars since {state.trained_on or 'the start'}; nothing to retrain on")
        minimum = trainer.min_training_examples
        if state.train_examples < minimum:
            return SkipReason(f"Dataset {state.latest_dataset} has {state.train_examples} training examples; "
                              f"retraining waits for {minimum} (VBATCH_MIN_TRAINING_EXAMPLES)")
        return RunRequest(run_key=f"retrain-{state.latest_dataset}", tags={TRIGGER_TAG: "schedule"})

    return retraining_schedule
