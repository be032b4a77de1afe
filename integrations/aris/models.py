"""The Aris extension's own state, in vbatch's metadata DB (migration 0004), never in Aristotle."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from vbatch_pipelines.store.models import Base


class ArisLink(Base):
    """The Aris extension: a conquest in Aristotle and the curation task that reviews its result, with the
    state both sides last agreed on (what the sync compares against to tell who changed what)."""

    __tablename__ = "aris_links"

    conquest_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    ls_task_id: Mapped[int | None] = mapped_column(Integer, nullable=True, unique=True)
    batch_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    philosopher: Mapped[str | None] = mapped_column(String(256), nullable=True)
    domain: Mapped[str | None] = mapped_column(String(256), nullable=True)
    conquest_type: Mapped[str | None] = mapped_column(String(128), nullable=True)
    agreed_gold: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # None: never agreed yet
    seen_result: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the row as last read/written
    seen_updated_at: Mapped[str | None] = mapped_column(String(40), nullable=True)
    prior_result: Mapped[str | None] = mapped_column(String(32), nullable=True)  # before vbatch set VICTORY
    pending: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[int] = mapped_column(BigInteger, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    example_since: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # gold on both sides since
    icl_uses: Mapped[int] = mapped_column(Integer, default=0)
    icl_last_used_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class ArisEvent(Base):
    """What the Aris sync did (or failed to do), newest last: visible in the UI's checks and the API."""

    __tablename__ = "aris_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conquest_id: Mapped[str] = mapped_column(String(256), index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    detail: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)

    def to_openai(self) -> dict[str, Any]:
        """As the API lists it (``GET /v1/aris/conflicts``) and the sync asset's metadata shows it."""
        return {"id": str(self.id), "object": f"aris.{self.kind}", "conquest_id": self.conquest_id,
                "created_at": self.created_at, **(self.detail or {})}
