"""Retraining on new gold stars: how many arrived since the dataset the last fine-tune trained on, the
automation condition that fires once per dataset version bringing at least N of them, and the job a
retrain records (the fine_tuning_sensor launches it like any other)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import desc, func, select

from vbatch_pipelines.curation.service import ready_datasets
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import CurationTask, Dataset, FineTuningJob


@dataclass(frozen=True)
class RetrainingState:
    new_gold_stars: int  # starred or re-reviewed since the last fine-tune's dataset, and in the latest one
    latest_dataset: str | None
    trained_on: str | None  # the dataset version the last fine-tune (not failed or cancelled) used
    train_examples: int = 0  # in the latest dataset


def retraining_state(db: Database) -> RetrainingState:
    with db.session() as session:
        latest = session.scalars(ready_datasets()).first()
        if latest is None:
            return RetrainingState(0, None, None)
        last_job = session.scalars(
            select(FineTuningJob).where(FineTuningJob.dataset_version.is_not(None),
                                        FineTuningJob.status.not_in(("failed", "cancelled")))
            .order_by(desc(FineTuningJob.created_at))).first()
        basis = session.get(Dataset, last_job.dataset_version) if last_job else None
        count = session.scalar(select(func.count()).select_from(CurationTask).where(
            CurationTask.gold_star.is_(True), CurationTask.changed_seq > (basis.source_seq if basis else 0),
            CurationTask.changed_seq <= latest.source_seq))
    return RetrainingState(int(count or 0), latest.version, basis.version if basis else None, latest.train_examples)


def record_retraining(db: Database, model_registry, file_store, trainer, policy, trigger: str) -> FineTuningJob:
    """A fine-tuning job of the policy's model (default: the default model) on the latest dataset, deployed
    through the policy's gate."""
    from vbatch_pipelines.fine_tuning.service import FineTuningError, create_job

    state = retraining_state(db)
    if state.latest_dataset is None:
        raise FineTuningError("No gold-star dataset yet: star some answers in Label Studio first", "training_file")
    return create_job(db, model_registry, file_store, trainer, model=policy.model or model_registry.default_model_id(),
                      training_file=state.latest_dataset, hyperparameters=policy.hyperparameters,
                      suffix="retrain", trigger=trigger, deploy=policy.deploy_gate,
                      metadata={"new_gold_stars": str(state.new_gold_stars)})
