"""Which inference servers exist, on every node: the ``engines`` table of the metadata DB.

A managed engine (a vLLM server vbatch started) records itself when it comes up and when it stops; an external
one (VBATCH_ENGINES: a vLLM Deployment behind a Service, a server on another box) is recorded when it is
configured. Whoever sends requests records what it saw (up, or down with the error), so every node, the
dashboard and ``/metrics`` read one picture. Local state files stay what they were: how a node finds and stops
its own processes."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from sqlalchemy import select

from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import EngineRecord

UP, DOWN, STOPPED = "up", "down", "stopped"


@dataclass(frozen=True)
class Replica:
    """One server of a base model, as the registry knows it."""

    id: str
    model: str
    base_url: str
    node: str
    kind: str  # managed | external
    status: str
    pid: int | None = None
    adapters: tuple[str, ...] = ()
    last_error: str | None = None
    api_key: str | None = field(default=None, repr=False)  # what a managed engine takes requests with

    @classmethod
    def of(cls, row: EngineRecord) -> Replica:
        return cls(row.id, row.model, row.base_url, row.node, row.kind, row.status, row.pid,
                   tuple(row.adapters or ()), row.last_error, row.api_key)


def managed_id(node: str, model: str) -> str:
    return f"{node}/{model}"[:160]


def external_id(model: str, base_url: str) -> str:
    digest = hashlib.sha1(f"{model}\0{base_url}".encode()).hexdigest()[:16]
    return f"ext:{digest}"


class EngineRegistry:
    def __init__(self, db: Database):
        self.db = db

    def record(self, *, id: str, model: str, base_url: str, node: str, kind: str, status: str = UP,
               pid: int | None = None, adapters: list[str] | None = None, error: str | None = None,
               api_key: str | None = None) -> None:
        """Upsert one server's state (what a node saw just now); ``api_key`` a managed engine's, set as it starts."""
        with self.db.session() as session:
            row = session.get(EngineRecord, id)
            if row is None:
                row = EngineRecord(id=id, created_at=int(time.time()))
                session.add(row)
            row.model, row.base_url, row.node, row.kind, row.status = model, base_url, node, kind, status
            if pid is not None:
                row.pid = pid
            if adapters is not None:
                row.adapters = sorted(adapters)
            if api_key is not None:
                row.api_key = api_key
            row.last_error = error[:2000] if error else None
            row.checked_at = time.time()

    def mark(self, id: str, status: str, error: str | None = None) -> None:
        """A server seen up or down by someone who sent it requests (nothing else about it changes)."""
        with self.db.session() as session:
            row = session.get(EngineRecord, id)
            if row is None:
                return
            row.status, row.checked_at = status, time.time()
            row.last_error = error[:2000] if error else None

    def replicas(self, model: str | None = None, *, status: str | None = None) -> list[Replica]:
        query = select(EngineRecord).order_by(EngineRecord.model, EngineRecord.id)
        if model is not None:
            query = query.where(EngineRecord.model == model)
        if status is not None:
            query = query.where(EngineRecord.status == status)
        with self.db.session() as session:
            return [Replica.of(row) for row in session.scalars(query)]

    def forget(self, id: str) -> None:
        with self.db.session() as session:
            row = session.get(EngineRecord, id)
            if row is not None:
                session.delete(row)
