"""Response models: the shapes the API returns, field for field as OpenAI's objects (and vbatch's own),
declared on the routes so ``/openapi.json`` documents them and FastAPI checks every response against them.
The fuzz test (schemathesis) checks the same conformance from the outside."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from vbatch_pipelines.protocol import ChatCompletionResponse, CompletionResponse, ErrorBody

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """A cursor page, as OpenAI's lists: ``after`` the ``last_id`` for the next one."""

    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class ErrorResponse(BaseModel):
    error: ErrorBody


class StrictBody(BaseModel):
    """A request body of one of vbatch's own routes: a field it does not know is refused (400 naming it), never
    ignored, so an older client's spelling (``is_gold_star``) cannot be taken for a default."""

    model_config = ConfigDict(extra="forbid")


class Owned(BaseModel):
    """vbatch's own fields on a project's object."""

    project_id: str | None = Field(default=None, description="vbatch: the project it belongs to")
    created_by: str | None = Field(default=None, description="vbatch: the key that created it (its id), or who "
                                                             "else did (a settings key, the CLI, a schedule)")


# -- files ------------------------------------------------------------------------------------------


class FileObject(Owned):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    expires_at: int | None = None
    status_details: str | None = None


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool


# -- batches ----------------------------------------------------------------------------------------


class BatchError(BaseModel):
    code: str | None = None
    line: int | None = None
    message: str
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens_details: dict[str, int]


class BatchObject(Owned):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None
    usage: BatchUsage | None = None


# -- models -----------------------------------------------------------------------------------------


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str = Field(description="vbatch: the base model that serves it")
    parent: str | None = Field(default=None, description="vbatch: a fine-tune's base model")
    status: str | None = Field(default=None, description="vbatch: an install's state (installing, ready, failed)")
    source: str | None = None
    revision: str | None = None
    details: dict[str, Any] | None = None
    project_id: str | None = Field(default=None, description="vbatch: a fine-tune's project (None: a base model, "
                                                             "everyone's)")
    shared: bool | None = Field(default=None, description="vbatch: a fine-tune served to every project")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


# -- fine-tuning ------------------------------------------------------------------------------------


class FineTuningHyperparameters(BaseModel):
    n_epochs: int | str | None = None
    batch_size: int | str | None = None
    learning_rate_multiplier: float | str | None = None
    beta: float | str | None = Field(default=None, description="DPO's only")


class FineTuningError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningMethod(BaseModel):
    """OpenAI's: ``type`` and, under the type's own key, its hyperparameters."""

    type: Literal["supervised", "dpo"] = "supervised"
    supervised: dict[str, FineTuningHyperparameters] | None = None
    dpo: dict[str, FineTuningHyperparameters] | None = None


class FineTuningJobObject(Owned):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    fine_tuned_model: str | None = None
    organization_id: str
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    training_file: str
    validation_file: str | None = None
    hyperparameters: FineTuningHyperparameters
    result_files: list[str]
    trained_tokens: int | None = None
    error: FineTuningError | None = None
    created_at: int
    finished_at: int | None = None
    estimated_finish: int | None = None
    seed: int
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]]
    method: FineTuningMethod
    vbatch: dict[str, Any] = Field(description="vbatch's own: the full recipe, its dataset, trigger, deploy "
                                               "policy, metrics and Dagster run")


class FineTuningEventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class FineTuningCheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class FineTuningComparison(BaseModel):
    """vbatch's own: base and fine-tune on the job's held-out examples."""

    model_config = ConfigDict(extra="allow")

    object: Literal["fine_tuning.job.comparison"] = "fine_tuning.job.comparison"
    fine_tuning_job_id: str
    examples: int
    base: dict[str, Any]
    fine_tuned: dict[str, Any]
    rows: list[dict[str, Any]]


# -- evals ------------------------------------------------------------------------------------------


class EvalObject(Owned):
    """A fixed evaluation set: its items frozen (and fingerprinted) when an admin made it."""

    id: str
    object: Literal["eval"] = "eval"
    name: str
    created_at: int
    source: dict[str, Any]
    items: int
    fingerprint: str


class EvalRunObject(Owned):
    """One model scored on one set (its ``eval_score`` partition)."""

    id: str
    object: Literal["eval.run"] = "eval.run"
    eval_id: str
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    created_at: int
    finished_at: int | None = None
    scores: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = []
    batches: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    dagster_run_id: str | None = None


class Leaderboard(BaseModel):
    """vbatch's own: each model's latest completed score on a set, best first."""

    object: Literal["eval.leaderboard"] = "eval.leaderboard"
    eval_id: str
    name: str
    items: int
    ranked_by: list[str]
    data: list[dict[str, Any]]


# -- curation ---------------------------------------------------------------------------------------


class ReviewVote(BaseModel):
    reviewer: str
    gold_star: bool
    rating: int | None = None
    edited: bool
    updated_at: str | None = None


class CurationTaskObject(Owned):
    id: int | None = Field(description="the Label Studio task id")
    object: Literal["curation.task"] = "curation.task"
    batch_id: str
    custom_id: str
    schema_: str = Field(alias="schema", serialization_alias="schema")
    model: str | None = None
    messages: list[dict[str, Any]]
    response: str
    edited_response: str | None = None
    rating: int | None = None
    gold_star: bool
    annotated: bool
    created_at: int
    reviewed_at: int | None = None
    review_error: str | None = Field(default=None, description="why the edited answer is invalid for its schema "
                                     "(such a task is left out of datasets until the edit is fixed)")
    reviews: int = Field(default=0, description="how many reviewers reviewed it")
    gold_votes: int = Field(default=0, description="how many of them starred it (a gold star takes the project's "
                                                   "gold_star_agreement)")
    agreement: float | None = Field(default=None, description="the share of its reviewers on the majority's side "
                                                              "(two reviewers or more)")
    votes: list[ReviewVote] = Field(default_factory=list, description="each reviewer's latest review")
    assignees: list[str] = Field(default_factory=list, description="the reviewers it is handed to")

    model_config = ConfigDict(populate_by_name=True)


class SchemaCounts(BaseModel):
    tasks: int
    annotated: int
    gold_stars: int


class DayCounts(BaseModel):
    reviewed: int
    gold_stars: int


class ReviewPolicy(BaseModel):
    annotations_per_task: int = Field(description="N: annotations wanted per task")
    gold_star_agreement: int = Field(description="k: gold-star votes of them for a gold star")


class ReviewerCounts(BaseModel):
    reviews: int
    gold_stars: int
    shared: int = Field(description="their reviews of tasks that two reviewers or more reviewed")
    agreement: float | None = Field(description="how often their vote matched the task's outcome, on those")


class ReviewerStats(BaseModel):
    policy: ReviewPolicy
    tasks_with_several_reviews: int
    agreement: float | None = Field(description="the mean share of reviewers on the majority's side, per task")
    by_reviewer: dict[str, ReviewerCounts]


class CurationStats(BaseModel):
    object: Literal["curation.stats"] = "curation.stats"
    tasks: int
    annotated: int
    gold_stars: int
    by_schema: dict[str, SchemaCounts]
    by_day: dict[str, DayCounts]
    reviewers: ReviewerStats


class DatasetObject(Owned):
    id: str
    object: Literal["dataset"] = "dataset"
    version: str
    kind: Literal["sft", "preference"] = Field(description="sft: gold-star chat examples; preference: chosen/"
                                                           "rejected pairs (examples counts pairs)")
    created_at: int
    examples: int
    train_examples: int
    eval_examples: int
    fingerprint: str
    counts: dict[str, Any]
    formats: list[str]
    filter: dict[str, Any] | None = Field(default=None, description="what the version was built from (null: every "
                                                                    "gold star of its project)")


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DatasetObject]
    has_more: bool


class WebhookReceipt(BaseModel):
    received: str | None
    changed_tasks: list[int]


# -- operations -------------------------------------------------------------------------------------


class ServiceHealth(BaseModel):
    pid: int
    port: int | None = None
    running: bool
    restarts: int
    uptime_s: float | None = None


class Health(BaseModel):
    status: Literal["ok", "error"]
    database: str
    dagster: str
    label_studio: str = Field(description='"ok", what is wrong, or "off: <why>" (curation off, not installed)')
    services: dict[str, ServiceHealth] = Field(default_factory=dict,
                                               description="what `vbatch up` supervises on this home (empty when "
                                                           "the API runs on its own)")


# Bodies that are files or streams, documented by media type.
BINARY = {"schema": {"type": "string", "format": "binary"}}
FILE_DOWNLOAD = {200: {"content": {"application/octet-stream": BINARY}, "description": "the file's bytes"}}
DATASET_DOWNLOAD = {200: {"content": {"application/jsonl": BINARY, "application/json": BINARY},
                          "description": "the dataset split in the chosen format"}}
# With ``stream: true``: server-sent events, each ``data:`` a JSON chunk (``chat.completion.chunk`` or a
# text_completion) and the last ``[DONE]``, or (Responses) each a typed ``event:`` with its ``data:``. The
# schema describes one event.
COMPLETION_STREAM = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}}}}}
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 415, 503)}

__all__ = ["BINARY", "COMPLETION_STREAM", "ChatCompletionResponse", "CompletionResponse", "DATASET_DOWNLOAD",
           "ERRORS", "FILE_DOWNLOAD"]
