"""The metadata DB's tables: files and batches, shaped after OpenAI's objects.

Timestamps are Unix seconds (as the OpenAI API returns them). JSON columns hold the parts of an object
that OpenAI nests (errors, metadata, usage).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class File(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16), default="processed")
    path: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

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
        }


BATCH_STATUSES = (
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled",
)
TERMINAL_BATCH_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})


class Batch(Base):
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
        }


class CurationTask(Base):
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
    project_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ls_task_id: Mapped[int | None] = mapped_column(Integer, nullable=True, unique=True)
    annotation_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    edited_response: Mapped[str | None] = mapped_column(Text, nullable=True)
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gold_star: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    annotated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger)
    reviewed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    changed_seq: Mapped[int] = mapped_column(BigInteger, default=0, index=True)  # bumps on every change

    def final_response(self) -> str:
        return self.edited_response if self.edited_response is not None else self.response

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.ls_task_id, "object": "curation.task", "batch_id": self.batch_id,
            "custom_id": self.custom_id, "schema": self.schema, "model": self.model,
            "messages": self.messages, "response": self.response, "edited_response": self.edited_response,
            "rating": self.rating, "gold_star": self.gold_star, "annotated": self.annotated,
            "created_at": self.created_at, "reviewed_at": self.reviewed_at,
        }


class Dataset(Base):
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

    def to_api(self) -> dict[str, Any]:
        return {"id": self.version, "object": "dataset", "version": self.version, "created_at": self.created_at,
                "examples": self.examples, "train_examples": self.train_examples,
                "eval_examples": self.eval_examples, "fingerprint": self.fingerprint, "counts": self.counts,
                "formats": list(EXPORT_FORMATS)}


EXPORT_FORMATS = ("openai", "chatml", "alpaca", "sharegpt")
