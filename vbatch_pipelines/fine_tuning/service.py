"""Fine-tuning jobs as records: what the REST API, the assets, the schedule and the CLI share.

A job is a row (OpenAI's ``fine_tuning.job``) plus a directory ``$VBATCH_HOME/fine_tunes/<job_id>/``
holding its training data, adapter, checkpoints and logs. Its id is also its Dagster partition key.
Training data is checked when the job is created (``training_data``: a bad file is refused with line
numbers, never queued); a job trains on an uploaded file (purpose ``fine-tune``) or a dataset version: gold
stars for a supervised job, preference pairs for a DPO one. A DPO job may continue a fine-tune (``model`` an
``ft:`` name): its adapter is copied into the job and trained further against itself as the reference, and the
result is again one adapter on the same base model.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import desc, select

from vbatch_pipelines.fine_tuning import FineTuningError

if TYPE_CHECKING:
    from vbatch_pipelines.curation.filters import DatasetFilter
from vbatch_pipelines.fine_tuning.comparison import DEPLOY_GATES
from vbatch_pipelines.fine_tuning.hyperparameters import METHODS, parse_hyperparameters
from vbatch_pipelines.fine_tuning.training_data import model_max_length, training_sources, write_training_data
from vbatch_pipelines.models.registry import EMBED, GENERATE
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import (
    DEFAULT_OWNER,
    TERMINAL_FINE_TUNING_STATUSES,
    FineTuningCheckpoint,
    FineTuningEvent,
    FineTuningJob,
    Owner,
    of_project,
)

SUFFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
INITIAL_ADAPTER = "initial_adapter"  # in a job's data dir: the fine-tune a DPO job continues


def now() -> int:
    return int(time.time())


def new_job_id() -> str:
    return f"ftjob-{uuid.uuid4().hex[:24]}"


def fine_tuned_model_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's naming: ``ft:BASE:ORG:SUFFIX:ID``."""
    return f"ft:{base}:vbatch:{suffix or ''}:{job_id.removeprefix('ftjob-')[:8]}"


# --- jobs --------------------------------------------------------------------------------------------

def create_job(db: Database, model_registry, file_store, trainer, *, model: str, training_file: str,
               validation_file: str | None = None, hyperparameters: dict[str, Any] | None = None,
               suffix: str | None = None, seed: int | None = None, metadata: dict[str, str] | None = None,
               trigger: str = "api", deploy: str = "always", owner: Owner = DEFAULT_OWNER,
               method: str = "supervised", dataset_filter: DatasetFilter | None = None) -> FineTuningJob:
    """Check everything a job needs, record it (``queued``, ``owner``'s: its files and datasets are the ones
    it may train on) and copy its data into the job dir. The resources say which models exist
    (``model_registry``), where jobs live (``file_store``) and what the trainer accepts (``trainer``: minimum
    examples, largest LoRA rank, GPUs)."""
    if deploy not in DEPLOY_GATES:
        raise FineTuningError(f"deploy must be one of {', '.join(DEPLOY_GATES)}", "deploy", "invalid_value")
    if method not in METHODS:
        raise FineTuningError(f"method.type must be one of {', '.join(METHODS)}, got {method!r}", "method.type",
                              "invalid_value")
    spec = model_registry.lookup(model, project=owner.project_id)
    if spec.task != GENERATE:  # the trainer is supervised fine-tuning of a language model
        kind = "an embedding model" if spec.task == EMBED else "a cross-encoder"
        raise FineTuningError(f"{model} is {kind}; only text-generation models can be fine-tuned",
                              "model", "invalid_model")
    starting = None
    if spec.adapter:
        if method != "dpo":
            raise FineTuningError(f"{model} is itself a fine-tune; fine-tune its base model {spec.parent} instead "
                                  "(a DPO job can continue a fine-tune)", "model", "invalid_model")
        starting, spec = spec, model_registry.lookup(spec.parent, project=owner.project_id)
    if suffix is not None and not SUFFIX.match(suffix):
        raise FineTuningError("suffix takes 1 to 64 letters, digits, '-', '_' or '.'", "suffix", "invalid_value")
    if metadata and (len(metadata) > 16 or any(len(k) > 64 or len(str(v)) > 512 for k, v in metadata.items())):
        raise FineTuningError("metadata takes at most 16 pairs (keys ≤64, values ≤512 characters)", "metadata")
    hp = parse_hyperparameters(hyperparameters, method)
    if hp.lora_rank > trainer.max_lora_rank:
        raise FineTuningError(f"lora_rank {hp.lora_rank} exceeds the engine's maximum LoRA rank "
                              f"{trainer.max_lora_rank} (VBATCH_MAX_LORA_RANK)", "hyperparameters.lora_rank",
                              "invalid_value")
    if hp.qlora and not trainer.gpus:
        raise FineTuningError("qlora (4-bit base weights) needs a CUDA GPU; this machine has none: use LoRA",
                              "hyperparameters.qlora", "invalid_value")
    sources = training_sources(db, training_file, validation_file, minimum=trainer.min_training_examples,
                               project_id=owner.project_id, method=method, chosen=dataset_filter)
    resolved = hp.resolved(sources["train_examples"], model_max_length(spec.path))
    job_id = new_job_id()
    directory = file_store.fine_tune_dir(job_id)
    (directory / "data").mkdir(parents=True, exist_ok=True)
    write_training_data(sources, directory / "data")
    if starting is not None:  # its own copy: the fine-tune it continues may be undeployed or removed meanwhile
        shutil.copytree(starting.adapter, directory / "data" / INITIAL_ADAPTER, dirs_exist_ok=True)
        config = json.loads((directory / "data" / INITIAL_ADAPTER / "adapter_config.json").read_text())
        resolved.update(lora_rank=config["r"], lora_alpha=config.get("lora_alpha") or 2 * config["r"])
    job = FineTuningJob(
        id=job_id, model=spec.id, status="queued", training_file=training_file, validation_file=validation_file,
        dataset_version=sources["dataset_version"], hyperparameters=resolved, suffix=suffix,
        dataset_filter=(dataset_filter.given() or None) if dataset_filter is not None else None,
        seed=seed if seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "big") % 2**31,
        metadata_=metadata or None, trigger=trigger, deploy=deploy, result_files=[], created_at=now(),
        method={"type": method} if method != "supervised" else None,
        starting_model=starting.id if starting is not None else None,
        output_dir=str(directory),
        metrics={"train_examples": sources["train_examples"], "eval_examples": sources["eval_examples"]},
        **owner.columns(),
    )
    with db.session() as session:
        session.add(job)
    add_event(db, job_id, f"Validated training data: {sources['train_examples']} training and "
                          f"{sources['eval_examples']} eval examples")
    add_event(db, job_id, "Fine-tuning job created")
    return job


def get_job(db: Database, job_id: str, project_id: str | None = None) -> FineTuningJob | None:
    """The job (of ``project_id`` only, when given: another project's is as good as missing)."""
    return of_project(db.get(FineTuningJob, job_id), project_id)


def require_job(db: Database, job_id: str) -> FineTuningJob:
    job = get_job(db, job_id)
    if job is None:
        raise FineTuningError(f"No fine-tuning job found with id '{job_id}'.", "fine_tuning_job_id",
                              "fine_tuning_job_not_found", 404)
    return job


def update_job(db: Database, job_id: str, **fields: Any) -> FineTuningJob:
    with db.session() as session:
        job = session.get(FineTuningJob, job_id, with_for_update=True)
        for key, value in fields.items():
            setattr(job, key, value)
    return job


def cancel_job(db: Database, job_id: str) -> FineTuningJob:
    """Cancel at once; a running trainer notices within a second and is interrupted."""
    with db.session() as session:
        job = session.get(FineTuningJob, job_id, with_for_update=True)
        if job is None:
            raise FineTuningError(f"No fine-tuning job found with id '{job_id}'.", "fine_tuning_job_id",
                              "fine_tuning_job_not_found", 404)
        if job.status in TERMINAL_FINE_TUNING_STATUSES:
            raise FineTuningError(f"Job {job_id} has already {job.status}; only a queued or running job can be "
                                  "cancelled", "fine_tuning_job_id", "invalid_state", 409)
        job.status = "cancelled"
        job.finished_at = now()
    add_event(db, job_id, "Fine-tuning job cancelled")
    return job


def fail_job(db: Database, job_id: str, code: str, message: str) -> bool:
    """End an unfinished job as ``failed`` with the reason; False if it had already ended."""
    message = message[:4000]
    with db.session() as session:
        job = session.get(FineTuningJob, job_id, with_for_update=True)
        if job is None or job.status in TERMINAL_FINE_TUNING_STATUSES:
            return False
        job.status, job.finished_at = "failed", now()
        job.error = {"code": code, "message": message, "param": None}
    add_event(db, job_id, f"Fine-tuning job failed: {message}", level="error")
    return True


def unfinished_jobs_with_run(db: Database) -> list[FineTuningJob]:
    with db.session() as session:
        return list(session.scalars(select(FineTuningJob).where(
            FineTuningJob.status.in_(("queued", "running")), FineTuningJob.dagster_run_id.is_not(None))))


def jobs_without_run(db: Database, older_than_s: int) -> list[str]:
    with db.session() as session:
        return list(session.scalars(select(FineTuningJob.id).where(
            FineTuningJob.status == "queued", FineTuningJob.dagster_run_id.is_(None),
            FineTuningJob.created_at <= now() - older_than_s)))


# --- events and checkpoints -------------------------------------------------------------------------

def add_event(db: Database, job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> None:
    add_events(db, job_id, [{"message": message, "level": level, "type": type, "data": data}])


def add_events(db: Database, job_id: str, events: list[dict[str, Any]]) -> None:
    """Several events in one transaction (a training poll brings every step since the last one)."""
    if not events:
        return
    stamp = now()
    with db.session() as session:
        session.add_all(FineTuningEvent(job_id=job_id, created_at=stamp, level=e.get("level", "info"),
                                        type=e.get("type", "message"), message=e["message"], data=e.get("data"))
                        for e in events)


def _children(db: Database, model, job_id: str, *, prefix: str, order, after: str | None, limit: int):
    """A page of a job's events or checkpoints, newest first; ``after`` is an id from the previous page."""
    require_job(db, job_id)
    with db.session() as session:
        query = select(model).where(model.job_id == job_id).order_by(desc(order))
        if after:
            try:
                anchor = int(after.removeprefix(prefix))
            except ValueError as exc:
                raise FineTuningError(f"after must be an id like {prefix}123, got {after!r}", "after") from exc
            query = query.where(model.id < anchor)
        rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_events(db: Database, job_id: str, *, after: str | None, limit: int) -> tuple[list[FineTuningEvent], bool]:
    return _children(db, FineTuningEvent, job_id, prefix="ftevent-", order=FineTuningEvent.id, after=after,
                     limit=limit)


def recent_messages(db: Database, job_id: str, limit: int = 30) -> list[FineTuningEvent]:
    """A job's newest message events, without its per-step metrics (a page of events can be all metrics)."""
    with db.session() as session:
        return list(session.scalars(select(FineTuningEvent).where(
            FineTuningEvent.job_id == job_id, FineTuningEvent.type != "metrics").order_by(
            desc(FineTuningEvent.id)).limit(limit)))


def loss_curve(db: Database, job_id: str, max_points: int = 400) -> list[tuple[int, float]]:
    """(step, training loss) from the whole run, thinned evenly to at most ``max_points`` (first and last kept)."""
    with db.session() as session:
        rows = session.scalars(select(FineTuningEvent.data).where(
            FineTuningEvent.job_id == job_id, FineTuningEvent.type == "metrics").order_by(FineTuningEvent.id))
        points = sorted({(data["step"], data["train_loss"]) for data in rows
                         if data and data.get("train_loss") is not None and data.get("step") is not None})
    if len(points) <= max_points:
        return points
    last = len(points) - 1
    return [points[round(i * last / (max_points - 1))] for i in range(max_points)]


def clear_checkpoints(db: Database, job_id: str) -> None:
    """A retrained job (Dagster's re-execute) replaces its checkpoints."""
    from sqlalchemy import delete

    with db.session() as session:
        session.execute(delete(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job_id))


def add_checkpoint(db: Database, job: FineTuningJob, step: int, path: str, metrics: dict[str, Any]) -> None:
    name = f"{fine_tuned_model_name(job.model, job.suffix, job.id)}:ckpt-step-{step}"
    with db.session() as session:
        session.add(FineTuningCheckpoint(job_id=job.id, created_at=now(), step_number=step,
                                         fine_tuned_model_checkpoint=name, metrics=metrics, path=path))


def list_checkpoints(db: Database, job_id: str, *, after: str | None,
                     limit: int) -> tuple[list[FineTuningCheckpoint], bool]:
    return _children(db, FineTuningCheckpoint, job_id, prefix="ftckpt-", order=FineTuningCheckpoint.step_number,
                     after=after, limit=limit)


def deploy_on_request(db: Database, model_registry, inference_engine, job: FineTuningJob) -> float:
    """Serve a succeeded job's fine-tune now: one the deploy gate held back, or one undeployed since (the
    API's deploy route and the console's deploy button)."""
    if job.status != "succeeded":
        raise FineTuningError(f"Job {job.id} is {job.status}; only a succeeded job can be deployed",
                              "fine_tuning_job_id", "job_not_succeeded", status=409)
    return deploy_fine_tune(db, model_registry, inference_engine, job, "deployed on request")


def deploy_fine_tune(db: Database, model_registry, inference_engine, job: FineTuningJob, reason: str) -> float:
    """Serve a finished job's adapter on its base model's engine (no restart) under its fine-tuned name;
    returns the load time in seconds. One path for the deployed_model asset and an explicit deploy."""
    from vbatch_pipelines.models.store import register_fine_tune

    adapter = (job.metrics or {}).get("adapter_dir")
    if not adapter:
        raise FineTuningError(f"Fine-tuning job {job.id} has no trained adapter to deploy (status {job.status})",
                              "job_id", "not_deployable", status=409)
    name = fine_tuned_model_name(job.model, job.suffix, job.id)
    spec = model_registry.resolve(job.model).with_adapter(name, adapter)
    started = time.monotonic()
    inference_engine.deploy_adapter(spec)
    seconds = round(time.monotonic() - started, 3)
    register_fine_tune(db, spec, job.id, Owner.of(job))
    update_job(db, job.id, fine_tuned_model=name, deployment={"status": "deployed", "reason": reason, "at": now()})
    add_event(db, job.id, f"New fine-tuned model created and deployed: {name} ({reason})")
    return seconds
