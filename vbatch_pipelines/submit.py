"""What a user submits through the REST API or the console: checked, recorded, then launched as a Dagster run.
A launch that cannot reach Dagster leaves the record in place and a sensor launches it later, so nothing that
was accepted is lost. One function per kind of work, shared by both front doors."""

from __future__ import annotations

import logging
from typing import Any

from vbatch_pipelines.batch.service import BatchRequestError, create_batch, get_batch, validate_input
from vbatch_pipelines.files import get_file
from vbatch_pipelines.fine_tuning.service import create_job, get_job
from vbatch_pipelines.launch import BatchLauncher, DagsterUnreachable, launch_fine_tune, launch_install
from vbatch_pipelines.models.store import get_model, request_install, upsert_model
from vbatch_pipelines.quotas import check_batch_quotas
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import DEFAULT_OWNER, Batch, FineTuningJob, Model, Owner

log = logging.getLogger("vbatch.submit")


def accept_batch(db: Database, file_store, model_registry, launcher: BatchLauncher, *, input_file_id: str,
                 endpoint: str, completion_window: str = "24h", metadata: dict[str, str] | None = None,
                 inline_validation_bytes: int = 0, output_expires_after: int | None = None,
                 owner: Owner = DEFAULT_OWNER) -> Batch:
    """Record a batch and have it launched, unless the project's quotas refuse it (QuotaExceeded: nothing is
    recorded). A file of at most ``inline_validation_bytes`` is validated here
    (under a second for 8 MiB), so the batch is in_progress, or failed with its line errors, on return;
    a larger one stays ``validating`` until batch_input streams it."""
    source = get_file(db, input_file_id, owner.project_id)
    if source is not None:  # a missing file is create_batch's to refuse
        check_batch_quotas(db, owner.project_id, source)
    batch = create_batch(db, input_file_id=input_file_id, endpoint=endpoint, completion_window=completion_window,
                         metadata=metadata, output_expires_after=output_expires_after, owner=owner)
    input_file = get_file(db, batch.input_file_id)
    inline = input_file is not None and input_file.bytes <= inline_validation_bytes
    if inline:
        try:
            if not validate_input(db, batch, file_store.batch_dir(batch.id),
                                  model_registry.resolver(batch.endpoint, batch.project_id)).ok:
                return get_batch(db, batch.id)
        except BatchRequestError as exc:  # the file vanished meanwhile: batch_input reports it
            log.warning("batch %s: inline validation skipped: %s", batch.id, exc)
    # In the background, with every batch recorded meanwhile: concurrent creates share a run.
    launcher.launch(batch.id, validated=inline)
    return get_batch(db, batch.id) or batch


def start_install(db: Database, model_registry, inference_engine, dagster_url: str, source: str, *,
                  model_id: str | None = None, revision: str | None = None, trust_remote_code: bool = False) -> Model:
    """Check and record an install, then launch its run; returns its record. Refused (InstallError) before
    anything is recorded when the policy or the fit check says no."""
    row = request_install(db, model_registry, inference_engine, source, model_id=model_id, revision=revision,
                          trust_remote_code=trust_remote_code)
    try:
        run_id = launch_install(row.id, dagster_url, timeout=5)
        upsert_model(db, row.id, details={**(row.details or {}), "dagster_run_id": run_id})
    except DagsterUnreachable as exc:
        # Recorded as installing: model_install_sensor launches it once Dagster is back.
        log.warning("install of %s recorded, launch deferred to the sensor: %s", row.id, exc)
    return get_model(db, row.id)


def start_fine_tune(db: Database, model_registry, file_store, trainer, dagster_url: str, **job: Any) -> FineTuningJob:
    """Check and record a fine-tuning job (``create_job``'s arguments), then launch its run."""
    created = create_job(db, model_registry, file_store, trainer, **job)
    try:
        launch_fine_tune(db, created.id, dagster_url, timeout=5)
    except DagsterUnreachable as exc:
        # Recorded and queued: fine_tuning_sensor launches it once Dagster is back.
        log.warning("fine-tuning job %s recorded, launch deferred to the sensor: %s", created.id, exc)
    return get_job(db, created.id) or created


def start_eval_run(db: Database, model_registry, dagster_url: str, eval_id: str, model: str, *,
                   owner: Owner = DEFAULT_OWNER):
    """Record a model's scoring on an eval set (the owner's project's set and a model it can use), then launch its
    (set, model) run; the eval sensor launches it when Dagster cannot be reached now."""
    from vbatch_pipelines import evals
    from vbatch_pipelines.launch import launch_eval_run
    from vbatch_pipelines.store.models import EvalRun

    record = evals.get_eval_set(db, eval_id, owner.project_id)
    spec = model_registry.lookup(model, project=owner.project_id)  # a model this project cannot use: a 404
    run = evals.record_run(db, record, spec.id, owner)
    try:
        launch_eval_run(db, run.id, record.id, spec.id, dagster_url, timeout=5)
    except DagsterUnreachable as exc:
        log.warning("eval run %s recorded, launch deferred to the sensor: %s", run.id, exc)
    return db.get(EvalRun, run.id)
