"""Retraining: each materialization of ``retraining_request`` records a fine-tuning job on the latest gold
stars of each project that has new ones (launched by fine_tuning_sensor), deployed only through the policy's
gate. It runs when enough new gold stars arrived in a project (an automation condition and its sensor), on the
retraining schedule, or from the UI's materialize button. Its thresholds are needed when the definitions load, so this domain is built from the
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
    MetadataValue,
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
from vbatch_pipelines.fine_tuning.retraining import RetrainingState, record_retraining, retraining_states
from vbatch_pipelines.names import (
    RETRAINING_JOB,
    SCHEDULE_NAME_TAG,
    SENSOR_NAME_TAG,
    TRIGGER_TAG,
)
from vbatch_pipelines.store.db import get_database


class NewGoldStars(AutomationCondition):
    """In some project, at least ``minimum`` gold stars arrived since the dataset its last fine-tune trained on,
    in a dataset version this condition has not fired for (its cursor: the versions it fired for): once per N,
    and never twice for one version. It runs in the code server, outside any run, so it is given the metadata
    DB's URL itself."""

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
        due = {state.latest_dataset for state in retraining_states(get_database(self._database_url))
               if state.new_gold_stars >= self.minimum}
        fired = set((context.cursor or "").split(",")) - {""}
        fire = bool(due - fired)
        return AutomationResult(context, context.candidate_subset if fire else context.get_empty_subset(),
                                cursor=",".join(sorted(due)) if fire else context.cursor)


def due_for_retraining(states: list[RetrainingState], trigger: str, minimum: int) -> list[RetrainingState]:
    """The projects a retrain records a job for: those with ``minimum`` new gold stars (the automation), any
    (the schedule); a manual materialization takes every project with new ones, or, with none, every project
    with a dataset (a click always retrains)."""
    if trigger == "automation":
        return [state for state in states if state.new_gold_stars >= minimum]
    fresh = [state for state in states if state.new_gold_stars]
    return fresh if fresh or trigger == "schedule" else list(states)


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
        """For each project with new gold stars, a fine-tuning job of the policy's model on its latest gold-star
        dataset (launched by fine_tuning_sensor), deployed only if its comparison passes the gate
        (VBATCH_DEPLOY_GATE)."""
        db = metadata_db.db
        trigger = _trigger(context)
        due = due_for_retraining(retraining_states(db), trigger, retraining_policy.min_gold_stars)
        if not due:
            raise Failure("Cannot retrain: no gold-star dataset yet: star some answers in Label Studio first")
        jobs, refused = [], []
        for state in due:  # one project's refusal (too few examples) does not hold the others back
            try:
                job = record_retraining(db, model_registry, file_store, trainer, retraining_policy, trigger, state)
            except VbatchError as exc:
                context.log.warning(f"Cannot retrain {state.project_id}: {exc}")
                refused.append(f"{state.project_id}: {exc}")
                continue
            context.log.info(f"Recorded {job.id} for {state.project_id}: {job.model} on {state.latest_dataset} "
                             f"({state.new_gold_stars} new gold stars since "
                             f"{state.trained_on or 'no earlier fine-tune'})")
            jobs.append({"fine_tuning_job": job.id, "project_id": state.project_id, "base_model": job.model,
                         "dataset_version": state.latest_dataset,
                         "previous_dataset_version": state.trained_on or "", "new_gold_stars": state.new_gold_stars,
                         "trigger": job.trigger, "deploy_gate": job.deploy})
        if not jobs:
            raise Failure("Cannot retrain: " + "; ".join(refused))
        summary = jobs[0] if len(jobs) == 1 else {"fine_tuning_jobs": ", ".join(j["fine_tuning_job"] for j in jobs)}
        return MaterializeResult(metadata={**summary, "jobs": MetadataValue.json(jobs),
                                           "refused": MetadataValue.json(refused)})

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
        """Retrain on the schedule (VBATCH_RETRAIN_CRON) the projects where a gold star arrived since their last
        fine-tune."""
        fresh = due_for_retraining(retraining_states(metadata_db.db), "schedule", 1)
        if not fresh:
            return SkipReason("No new gold stars since the last fine-tunes; nothing to retrain on")
        minimum = trainer.min_training_examples
        small = [state for state in fresh if state.train_examples < minimum]
        if len(small) == len(fresh):
            return SkipReason(", ".join(f"Dataset {s.latest_dataset} has {s.train_examples} training examples"
                                        for s in small) + f"; retraining waits for {minimum} "
                                        "(VBATCH_MIN_TRAINING_EXAMPLES)")
        versions = "+".join(state.latest_dataset for state in fresh if state.train_examples >= minimum)
        return RunRequest(run_key=f"retrain-{versions}", tags={TRIGGER_TAG: "schedule"})

    return retraining_schedule
