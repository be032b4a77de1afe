"""Retraining on new gold stars, project by project: how many arrived since the dataset the project's last
fine-tune trained on, the automation condition that fires once per dataset version bringing at least N of
them, and the jobs a retrain records (the fine_tuning_sensor launches them like any other)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import desc, func, select

from vbatch_pipelines.curation.service import ready_datasets
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import DEFAULT_PROJECT, CurationTask, Dataset, FineTuningJob, Owner


@dataclass(frozen=True)
class RetrainingState:
    new_gold_stars: int  # starred or re-reviewed since the last fine-tune's dataset, and in the latest one
    latest_dataset: str | None
    trained_on: str | None  # the dataset version the last fine-tune (not failed or cancelled) used
    train_examples: int = 0  # in the latest dataset
    project_id: str = DEFAULT_PROJECT


def retraining_state(db: Database, project_id: str = DEFAULT_PROJECT) -> RetrainingState:
    """Where the project stands: its latest dataset and the gold stars in it that no fine-tune has seen."""
    with db.session() as session:
        latest = session.scalars(ready_datasets(project_id)).first()
        if latest is None:
            return RetrainingState(0, None, None, project_id=project_id)
        last_job = session.scalars(
            select(FineTuningJob).where(FineTuningJob.project_id == project_id,
                                        FineTuningJob.dataset_version.is_not(None),
                                        FineTuningJob.status.not_in(("failed", "cancelled")))
            .order_by(desc(FineTuningJob.created_at))).first()
        basis = session.get(Dataset, last_job.dataset_version) if last_job else None
        count = session.scalar(select(func.count()).select_from(CurationTask).where(
            CurationTask.project_id == project_id, CurationTask.gold_star.is_(True),
            CurationTask.changed_seq > (basis.source_seq if basis else 0),
            CurationTask.changed_seq <= latest.source_seq))
    return RetrainingState(int(count or 0), latest.version, basis.version if basis else None, latest.train_examples,
                           project_id)


def retraining_states(db: Database) -> list[RetrainingState]:
    """Every project that has a gold-star dataset, in project order."""
    with db.session() as session:
        projects = sorted(set(session.scalars(select(Dataset.project_id).where(Dataset.status == "ready"))))
    return [retraining_state(db, project) for project in projects]


def record_retraining(db: Database, model_registry, file_store, trainer, policy, trigger: str,
                      state: RetrainingState) -> FineTuningJob:
    """A fine-tuning job of the policy's model (default: the default model) on the project's latest dataset,
    deployed through the policy's gate, owned by the project."""
    from vbatch_pipelines.fine_tuning.service import FineTuningError, create_job

    if state.latest_dataset is None:
        raise FineTuningError("No gold-star dataset yet: star some answers in Label Studio first", "training_file")
    return create_job(db, model_registry, file_store, trainer, model=policy.model or model_registry.default_model_id(),
                      training_file=state.latest_dataset, hyperparameters=policy.hyperparameters,
                      suffix="retrain", trigger=trigger, deploy=policy.deploy_gate,
                      metadata={"new_gold_stars": str(state.new_gold_stars)},
                      owner=Owner(state.project_id, f"retraining ({trigger})"))
