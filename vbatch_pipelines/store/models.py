"""The metadata DB's tables: files and batches, shaped after OpenAI's objects.

Timestamps are Unix seconds (as the OpenAI API returns them). JSON columns hold the parts of an object
that OpenAI nests (errors, metadata, usage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


DEFAULT_PROJECT = "proj_default"
SFT, PREFERENCE = "sft", "preference"  # the two kinds of dataset, and the fine-tuning methods that train on them
DATASET_KINDS = (SFT, PREFERENCE)


@dataclass(frozen=True)
class Owner:
    """Whose a new object is: its project, and the key (its id) or who else (a settings key, the CLI, a schedule,
    by name) created it. What a run makes (a batch's output file, a job's fine-tune) has its parent's owner."""

    project_id: str = DEFAULT_PROJECT
    created_by: str | None = None

    def columns(self) -> dict[str, Any]:
        return {"project_id": self.project_id, "created_by": self.created_by}

    @classmethod
    def of(cls, row: Owned) -> Owner:
        return cls(row.project_id, row.created_by)


def of_project(row, project_id: str | None):
    """``row`` when it is project ``project_id``'s (None: whoever's), else None: to a project, another project's
    object is one that does not exist (a 404, never a 403 confirming it). The one check every lookup makes."""
    return row if row is not None and (project_id is None or row.project_id == project_id) else None


DEFAULT_OWNER = Owner()  # the default project's, made by nobody named (a single user's setup, tests)


class Owned:
    """A project's object: only its project's keys see it (another project's id is a 404), and it says which key
    created it (``key_...``, or a settings key, the CLI, a schedule by name)."""

    project_id: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_PROJECT,
                                            server_default=DEFAULT_PROJECT)
    created_by: Mapped[str | None] = mapped_column(String(128), nullable=True)

    def ownership(self) -> dict[str, Any]:
        return {"project_id": self.project_id, "created_by": self.created_by}


class File(Owned, Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16), default="processed")
    path: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)  # its own expiry

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": self.status,
            "expires_at": self.expires_at,
            "status_details": None,
            **self.ownership(),
        }


BATCH_STATUSES = (
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled",
)
TERMINAL_BATCH_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})


class Batch(Owned, Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64), index=True)
    completion_window: Mapped[str] = mapped_column(String(16), default="24h")
    status: Mapped[str] = mapped_column(String(16), index=True, default="validating")
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    errors: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    in_progress_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finalizing_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    completed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    failed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    expired_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancelling_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    request_total: Mapped[int] = mapped_column(Integer, default=0)
    request_completed: Mapped[int] = mapped_column(Integer, default=0)
    request_failed: Mapped[int] = mapped_column(Integer, default=0)
    metadata_: Mapped[dict | None] = mapped_column("metadata", JSON, nullable=True)
    usage: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    dagster_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the run working on it
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)  # renewed while that run lives
    # OpenAI's output_expires_after: its result files expire this long after they are created (None: the default)
    output_expires_after: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": self.errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.request_total,
                "completed": self.request_completed,
                "failed": self.request_failed,
            },
            "metadata": self.metadata_,
            "usage": self.usage,
            **self.ownership(),
        }


class CurationTask(Owned, Base):
    """One batch result under review in Label Studio, and what the experts said about it."""

    __tablename__ = "curation_tasks"
    __table_args__ = (UniqueConstraint("batch_id", "custom_id", name="uq_curation_tasks_batch_custom_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(String(64), index=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    schema: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    messages: Mapped[list] = mapped_column(JSON)
    response: Mapped[str] = mapped_column(Text)
    ls_project_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # its Label Studio project
    ls_task_id: Mapped[int | None] = mapped_column(Integer, nullable=True, unique=True)
    annotation_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    edited_response: Mapped[str | None] = mapped_column(Text, nullable=True)
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gold_star: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    annotated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger)
    reviewed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    changed_seq: Mapped[int] = mapped_column(BigInteger, default=0, index=True)  # bumps on every change
    reviewer: Mapped[str | None] = mapped_column(String(256), nullable=True)  # who made the current review
    # Label Studio's updated_at of the recorded annotation (UTC ISO): webhook events older than it are stale
    annotation_updated_at: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # why the review's edited answer is invalid for its schema (e.g. not JSON): such a task stays out of datasets
    review_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # several reviewers: how many reviewed it, how many of them starred it, the share agreeing with the majority
    # (None below two); the gold star is gold_votes >= the project's review_agreement
    reviews: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    gold_votes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    agreement: Mapped[float | None] = mapped_column(Float, nullable=True)

    def final_response(self) -> str:
        return self.edited_response if self.edited_response is not None else self.response

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.ls_task_id, "object": "curation.task", "batch_id": self.batch_id,
            "custom_id": self.custom_id, "schema": self.schema, "model": self.model,
            "messages": self.messages, "response": self.response, "edited_response": self.edited_response,
            "rating": self.rating, "gold_star": self.gold_star, "annotated": self.annotated,
            "created_at": self.created_at, "reviewed_at": self.reviewed_at, "review_error": self.review_error,
            "reviews": self.reviews, "gold_votes": self.gold_votes, "agreement": self.agreement,
            **self.ownership(),
        }


class CurationReview(Base):
    """One live Label Studio annotation of a task: a reviewer's answer, rating and gold-star vote. A task's own
    review (answer, rating) is its latest one; its gold star counts each reviewer's latest vote."""

    __tablename__ = "curation_reviews"

    annotation_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ls_task_id: Mapped[int] = mapped_column(Integer, index=True)
    reviewer: Mapped[str] = mapped_column(String(256), index=True)
    answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gold_star: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[str | None] = mapped_column(String(40), nullable=True)  # Label Studio's, UTC ISO
    recorded_at: Mapped[int] = mapped_column(BigInteger)


class CurationAssignment(Base):
    """A task handed to a reviewer in vbatch's review queue (Label Studio Community has no assignment)."""

    __tablename__ = "curation_assignments"

    ls_task_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    reviewer: Mapped[str] = mapped_column(String(256), primary_key=True, index=True)
    assigned_at: Mapped[int] = mapped_column(BigInteger)


class Dataset(Owned, Base):
    """A gold-star dataset version: files on disk, counts, where it came from."""

    __tablename__ = "datasets"

    version: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    path: Mapped[str] = mapped_column(Text)
    examples: Mapped[int] = mapped_column(Integer)
    train_examples: Mapped[int] = mapped_column(Integer)
    eval_examples: Mapped[int] = mapped_column(Integer)
    fingerprint: Mapped[str] = mapped_column(String(64))
    source_seq: Mapped[int] = mapped_column(BigInteger)  # the highest curation change it includes
    counts: Mapped[dict] = mapped_column(JSON)
    dagster_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="ready", server_default="ready")  # building | ready
    # sft: gold-star chat examples | preference: chosen/rejected pairs (examples counts pairs)
    kind: Mapped[str] = mapped_column(String(16), default=SFT, server_default=SFT, index=True)
    # what the version was built from (None: every gold star of its project): a DatasetFilter's fields
    filter: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)

    def to_api(self) -> dict[str, Any]:
        return {"id": self.version, "object": "dataset", "version": self.version, "kind": self.kind,
                "filter": self.filter,
                "created_at": self.created_at, "examples": self.examples, "train_examples": self.train_examples,
                "eval_examples": self.eval_examples, "fingerprint": self.fingerprint, "counts": self.counts,
                "formats": list(EXPORT_FORMATS[self.kind]), **self.ownership()}


# What a dataset of each kind is exported as: chat examples four ways; preference pairs in OpenAI's preference
# fine-tuning format (input.messages, preferred_output, non_preferred_output) and TRL's (prompt, chosen, rejected).
EXPORT_FORMATS = {SFT: ("openai", "chatml", "alpaca", "sharegpt"), PREFERENCE: ("openai", "trl")}
TRAINER_FORMAT = {SFT: "openai", PREFERENCE: "trl"}  # the export the trainer reads (and eval sets are frozen from)


class EvalSet(Owned, Base):
    """A fixed evaluation set: prompts with gold answers, frozen when an admin made it (its items never change, so
    every model scored on it is scored on the same questions)."""

    __tablename__ = "eval_sets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    source: Mapped[dict] = mapped_column(JSON)  # {"type": "dataset", "version": ...} | {"type": "file", ...}
    items: Mapped[int] = mapped_column(Integer)
    fingerprint: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # items.jsonl: {"messages": [...prompt], "gold": ..., "rejected"?}

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "eval", "name": self.name, "created_at": self.created_at,
                "source": self.source, "items": self.items, "fingerprint": self.fingerprint, **self.ownership()}


EVAL_RUN_STATUSES = ("queued", "in_progress", "completed", "failed")


class EvalRun(Owned, Base):
    """One model scored on one eval set (its Dagster partition: the set and the model)."""

    __tablename__ = "eval_runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    eval_id: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    scores: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    rows: Mapped[list | None] = mapped_column(JSON, nullable=True)  # a sample: prompt, gold, answer, match
    batches: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the batches that asked the engine
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    dagster_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "eval.run", "eval_id": self.eval_id, "model": self.model,
                "status": self.status, "created_at": self.created_at, "finished_at": self.finished_at,
                "scores": self.scores, "rows": self.rows or [], "batches": self.batches, "error": self.error,
                "dagster_run_id": self.dagster_run_id, **self.ownership()}


FINE_TUNING_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_FINE_TUNING_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class FineTuningJob(Owned, Base):
    """A fine-tune, shaped after OpenAI's ``fine_tuning.job``; its Dagster partition key is its id."""

    __tablename__ = "fine_tuning_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(256))  # the base model
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    status: Mapped[str] = mapped_column(String(24), index=True)
    training_file: Mapped[str] = mapped_column(String(64))  # a file id, or a gold-star dataset version
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dataset_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    hyperparameters: Mapped[dict] = mapped_column(JSON)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    metadata_: Mapped[dict | None] = mapped_column("metadata", JSON, nullable=True)
    trigger: Mapped[str] = mapped_column(String(24), default="api")  # api | schedule | automation
    deploy: Mapped[str] = mapped_column(String(16), default="always")  # always | no_worse | never
    result_files: Mapped[list] = mapped_column(JSON, default=list)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # train/eval loss, steps, device
    comparison: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # {"status": deployed | rejected | undeployed, "reason": ..., "at": ...}: is the fine-tune served, and why
    deployment: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    output_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    dagster_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    method: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {"type": "dpo", ...}; None: supervised
    starting_model: Mapped[str | None] = mapped_column(String(512), nullable=True)  # the ft: model it continues
    dataset_filter: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)  # of its version

    @property
    def method_type(self) -> str:
        return (self.method or {}).get("type", "supervised")

    @property
    def deployed(self) -> bool:
        """Served now (a gate's rejection and an undeploy are recorded in ``deployment`` too)."""
        return (self.deployment or {}).get("status") == "deployed"

    def to_openai(self) -> dict[str, Any]:
        hp = self.hyperparameters or {}
        openai_hp = {"n_epochs": hp.get("n_epochs"), "batch_size": hp.get("batch_size"),
                     "learning_rate_multiplier": hp.get("learning_rate_multiplier")}
        return {
            "id": self.id, "object": "fine_tuning.job", "model": self.starting_model or self.model,
            "fine_tuned_model": self.fine_tuned_model, "organization_id": "vbatch", "status": self.status,
            **self.ownership(),
            "training_file": self.training_file, "validation_file": self.validation_file,
            "hyperparameters": openai_hp, "result_files": list(self.result_files or []),
            "trained_tokens": self.trained_tokens, "error": self.error, "created_at": self.created_at,
            "finished_at": self.finished_at, "estimated_finish": self.estimated_finish, "seed": self.seed,
            "suffix": self.suffix, "metadata": self.metadata_, "integrations": [],
            "method": {"type": self.method_type, self.method_type: {"hyperparameters": {
                **openai_hp, **({"beta": hp.get("beta")} if self.method_type == "dpo" else {})}}},
            # vbatch's own: the full recipe and where the job came from
            "vbatch": {"hyperparameters": hp, "dataset_version": self.dataset_version,
                       "dataset_filter": self.dataset_filter, "trigger": self.trigger,
                       "deploy": self.deploy, "deployment": self.deployment, "metrics": self.metrics,
                       "dagster_run_id": self.dagster_run_id, "base_model": self.model},
        }


class FineTuningEvent(Base):
    __tablename__ = "fine_tuning_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)

    def to_openai(self) -> dict[str, Any]:
        return {"id": f"ftevent-{self.id}", "object": "fine_tuning.job.event", "created_at": self.created_at,
                "level": self.level, "message": self.message, "type": self.type, "data": self.data}


class FineTuningCheckpoint(Base):
    __tablename__ = "fine_tuning_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    step_number: Mapped[int] = mapped_column(Integer)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(512))
    metrics: Mapped[dict] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(Text)

    def to_openai(self) -> dict[str, Any]:
        return {"id": f"ftckpt-{self.id}", "object": "fine_tuning.job.checkpoint", "created_at": self.created_at,
                "fine_tuned_model_checkpoint": self.fine_tuned_model_checkpoint, "fine_tuning_job_id": self.job_id,
                "metrics": {"step": self.step_number, **(self.metrics or {})}, "step_number": self.step_number}


class Model(Base):
    """A model vbatch serves beyond the configured ones: an installed base model or a fine-tune's
    adapter. Only rows with status ``ready`` (base) or ``deployed`` (fine-tune) are served."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(512), primary_key=True)  # the name requests use
    kind: Mapped[str] = mapped_column(String(16), index=True)  # base | fine_tune
    parent: Mapped[str | None] = mapped_column(String(256), nullable=True)  # a fine-tune's base model
    path: Mapped[str] = mapped_column(Text)  # model dir (base) or adapter dir (fine-tune)
    status: Mapped[str] = mapped_column(String(16), index=True)
    source: Mapped[str | None] = mapped_column(Text, nullable=True)  # HF repo id or local path; the job id
    revision: Mapped[str | None] = mapped_column(String(64), nullable=True)
    trust_remote_code: Mapped[bool] = mapped_column(Boolean, default=False)
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    details: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # fit check, smoke test, error
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    # A fine-tune belongs to its job's project and is served to that project only, unless an admin shares it;
    # base models (project_id None) are everyone's.
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    shared: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_by: Mapped[str | None] = mapped_column(String(128), nullable=True)

    def visible_to(self, project_id: str) -> bool:
        return self.project_id is None or self.shared or self.project_id == project_id


class EngineRecord(Base):
    """An inference server requests can be sent to: a replica of one base model, started by vbatch on a node
    (``managed``) or running elsewhere (``external``, VBATCH_ENGINES). The source of truth for which replicas
    of a model exist and which answered when last checked, whatever node asks."""

    __tablename__ = "engines"

    id: Mapped[str] = mapped_column(String(160), primary_key=True)  # <node>/<model> or ext:<model>@<url>
    model: Mapped[str] = mapped_column(String(512), index=True)  # the base model it serves
    base_url: Mapped[str] = mapped_column(Text)
    node: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))  # managed | external
    status: Mapped[str] = mapped_column(String(16), index=True)  # up | down | stopped
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)  # a managed engine's, on its node
    adapters: Mapped[list | None] = mapped_column(JSON, nullable=True)  # LoRA adapters loaded when last checked
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    api_key: Mapped[str | None] = mapped_column(String(128), nullable=True)  # a managed engine's (vllm_guard)
    checked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class Project(Base):
    """A team's share of the platform (OpenAI's projects): its keys, and later its objects, usage and quotas.
    ``proj_default`` holds the keys of VBATCH_API_KEYS and VBATCH_ADMIN_KEYS."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    archived_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # quotas (None: no limit): batches not ended, their requests not yet run, tokens since midnight UTC
    max_concurrent_batches: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_queued_requests: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_tokens_per_day: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    weight: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # its share of the engine
    # its review policy: N annotations wanted per task, k gold-star votes of them for a gold star
    review_annotations: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    review_agreement: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    def quotas(self) -> dict[str, int | None]:
        return {"max_concurrent_batches": self.max_concurrent_batches, "max_queued_requests": self.max_queued_requests,
                "max_tokens_per_day": self.max_tokens_per_day}

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "organization.project", "name": self.name, "created_at": self.created_at,
                "archived_at": self.archived_at, "status": "archived" if self.archived_at else "active",
                "quotas": self.quotas(), "weight": self.weight, "review": self.review_policy()}

    def review_policy(self) -> dict[str, int]:
        return {"annotations_per_task": self.review_annotations, "gold_star_agreement": self.review_agreement}


class Installation(Base):
    """This vbatch's own id (one row, made by migration 0016): what it writes into databases it shares with others
    carries it (Aris's rating rows), so two installs never take each other's rows for their own."""

    __tablename__ = "installation"

    key: Mapped[str] = mapped_column(String(16), primary_key=True)  # "vbatch"
    id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[int] = mapped_column(BigInteger)


class ConsoleSession(Base):
    """A console login: its cookie holds a random token (only its hash is kept here), never the API key. The caller
    is looked up through the key's hash on each request: a revoked key, or one taken out of the settings, ends
    its sessions; logging out ends one."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the session token
    key_hash: Mapped[str] = mapped_column(String(64), index=True)  # sha256 hex of the key it was opened with
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)
    ended_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ApiKey(Base):
    """A project's API key. Only a hash of the secret is kept; the secret is shown once, when created. A revoked
    key stays, for the record of who did what."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(128))
    owner: Mapped[str] = mapped_column(String(256))  # who holds it (a person's name or email)
    role: Mapped[str] = mapped_column(String(16))  # member | admin (of its project)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the secret
    redacted_value: Mapped[str] = mapped_column(String(32))  # sk-vb-...abcd, to recognise it
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    created_by: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the key (or operator) that made it
    last_used_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    def to_openai(self) -> dict[str, Any]:
        return {"object": "organization.project.api_key", "id": self.id, "name": self.name,
                "redacted_value": self.redacted_value, "created_at": self.created_at,
                "last_used_at": self.last_used_at, "project_id": self.project_id, "role": self.role,
                "revoked_at": self.revoked_at,
                "owner": {"type": "user", "user": {"object": "organization.project.user", "name": self.owner,
                                                   "role": self.role}}}


class AuditEvent(Base):
    """Who did what, when: an install, a delete, a deploy, a star, an edit, a key made or revoked."""

    __tablename__ = "audit_events"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)  # when it took effect
    type: Mapped[str] = mapped_column(String(64), index=True)  # model.installed, api_key.revoked, ...
    project_id: Mapped[str] = mapped_column(String(64), index=True)  # the caller's project
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # None: a settings key, the CLI, the operator
    actor: Mapped[str] = mapped_column(String(128))  # the key's name, or who else it was
    target: Mapped[str] = mapped_column(String(512))  # the id of what it was done to
    details: Mapped[dict | None] = mapped_column(JSON, nullable=True)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "organization.audit_log", "type": self.type, "effective_at": self.created_at,
                "project": {"id": self.project_id},
                "actor": {"type": "api_key", "api_key": {"id": self.key_id, "name": self.actor}},
                self.type: {"id": self.target, "data": self.details or {}}}


class UsageRecord(Base):
    """What a project used, by the minute: one row per ended batch (at its end), and online requests summed per
    minute, key, model and kind. ``GET /v1/organization/usage/*`` buckets and groups these rows."""

    __tablename__ = "usage_records"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    __table_args__ = (Index("ix_usage_records_project_minute", "project_id", "minute"),)

    minute: Mapped[int] = mapped_column(BigInteger, index=True)  # Unix seconds, a multiple of 60
    kind: Mapped[str] = mapped_column(String(16))  # completions | embeddings
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the key's id, or who else it was
    model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    batch: Mapped[bool] = mapped_column(Boolean)
    requests: Mapped[int] = mapped_column(Integer)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    # of input_tokens, those of lines answered with an identical line's response, not by the engine
    input_cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    engine_seconds: Mapped[float] = mapped_column(Float)
    batch_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)  # once per batch
