"""Quotas per project: batches not yet ended, their requests not yet run, tokens per day (UTC). Each is checked
before anything is recorded, so a refusal (429, the limit named) loses nothing: the file stays, the batches
already accepted run on. A platform admin sets them (``POST /v1/organization/projects/{id}``, ``vbatch projects
set``); None is no limit. Online requests carry OpenAI's ``x-ratelimit-*-tokens`` headers when a token quota is
set (``TokenBudget``)."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select

from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import TERMINAL_BATCH_STATUSES, Batch, File, Project

QUOTAS = ("max_concurrent_batches", "max_queued_requests", "max_tokens_per_day")
MAX_WEIGHT = 100


class QuotaExceeded(VbatchError):
    """A project's quota would be exceeded: OpenAI's 429, ``type`` saying what ran out (batches, requests,
    tokens) and the message naming the limit."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, project: Project, limit: str, value: int, used: str, kind: str,
                 headers: dict[str, str] | None = None):
        super().__init__(f"Project {project.name!r} ({project.id}) is at its {limit} quota of {value}: {used}. "
                         "Wait for work to finish (or tomorrow, for tokens), or ask a platform admin to raise it.",
                         None, type=kind)
        self.limit = limit
        self.headers = headers or {}


def day_start(now: float | None = None) -> int:
    """Midnight UTC today, in Unix seconds: when the tokens-per-day quota starts again."""
    moment = datetime.fromtimestamp(now if now is not None else time.time(), timezone.utc)
    return int(moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())


def count_lines(path: Path) -> int:
    """Lines in a JSONL file (a last line without a newline counts): its requests, before validation."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def check_batch_quotas(db: Database, project_id: str, input_file: File) -> None:
    """Refuse (QuotaExceeded) a new batch of ``input_file`` the project's quotas do not allow: one batch more
    than ``max_concurrent_batches`` not ended, its requests on top of those not yet run beyond
    ``max_queued_requests``, or the day's tokens used up (``max_tokens_per_day``)."""
    from vbatch_pipelines.usage import tokens_since

    project = db.get(Project, project_id)
    if project is None or not any(value is not None for value in project.quotas().values()):
        return
    with db.session() as session:
        open_batches = list(session.execute(
            select(Batch.id, Batch.request_total, Batch.request_completed, Batch.request_failed, Batch.input_file_id)
            .where(Batch.project_id == project_id, Batch.status.not_in(TERMINAL_BATCH_STATUSES))))
    if project.max_concurrent_batches is not None and len(open_batches) >= project.max_concurrent_batches:
        raise QuotaExceeded(project, "max_concurrent_batches", project.max_concurrent_batches,
                            f"{len(open_batches)} of its batches have not ended", "batches")
    if project.max_queued_requests is not None:
        queued = 0
        for _, total, completed, failed, file_id in open_batches:
            if not total:  # still validating: its file's lines
                source = db.get(File, file_id)
                total = count_lines(Path(source.path)) if source is not None and Path(source.path).exists() else 0
            queued += max(0, total - (completed or 0) - (failed or 0))
        adding = count_lines(Path(input_file.path))
        if queued + adding > project.max_queued_requests:
            raise QuotaExceeded(project, "max_queued_requests", project.max_queued_requests,
                                f"{queued} requests are queued and this batch adds {adding}", "requests")
    if project.max_tokens_per_day is not None:
        used = tokens_since(db, project_id, day_start())
        if used >= project.max_tokens_per_day:
            raise QuotaExceeded(project, "max_tokens_per_day", project.max_tokens_per_day,
                                f"{used} tokens were used today (UTC)", "tokens")


class TokenBudget:
    """The tokens-per-day quota of online requests: what each project used today (written usage, read at most
    once a second per project, plus what this API process counted since its last flush) against its limit."""

    READ_EVERY_S = 1.0

    def __init__(self, db: Database, usage):
        self.db = db
        self.usage = usage  # the process's OnlineUsage: its counts not yet written are added
        self._seen: dict[str, tuple[float, int, int | None, str]] = {}  # project -> (read at, used, limit, name)
        self._lock = threading.Lock()

    def _state(self, project_id: str) -> tuple[int, int | None, str]:
        from vbatch_pipelines.usage import tokens_since

        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(project_id)
        if seen is None or now - seen[0] >= self.READ_EVERY_S:
            project = self.db.get(Project, project_id)
            limit = project.max_tokens_per_day if project is not None else None
            used = tokens_since(self.db, project_id, day_start()) if limit is not None else 0
            seen = (now, used, limit, project.name if project is not None else project_id)
            with self._lock:
                self._seen[project_id] = seen
        return seen[1] + self.usage.pending_tokens(project_id), seen[2], seen[3]

    def headers(self, project_id: str) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*-tokens`` headers for the project (none without a token quota)."""
        used, limit, _ = self._state(project_id)
        if limit is None:
            return {}
        reset = day_start() + 86400 - int(time.time())
        return {"x-ratelimit-limit-tokens": str(limit), "x-ratelimit-remaining-tokens": str(max(0, limit - used)),
                "x-ratelimit-reset-tokens": f"{reset // 3600}h{reset % 3600 // 60}m{reset % 60}s"}

    def check(self, project_id: str) -> dict[str, str]:
        """The headers, or QuotaExceeded (with them) when the day's tokens are used up."""
        used, limit, name = self._state(project_id)
        headers = self.headers(project_id)
        if limit is not None and used >= limit:
            raise QuotaExceeded(Project(id=project_id, name=name), "max_tokens_per_day", limit,
                                f"{used} tokens were used today (UTC)", "tokens", headers)
        return headers


def set_quotas(db: Database, project_id: str, *, weight: int | None = None, **quotas: int | None) -> Project:
    """Set some of a project's quotas (None: no limit) and its fair-share weight; bad values are refused whole."""
    from vbatch_pipelines.projects import ProjectError, ProjectNotFound

    for name, value in quotas.items():
        if name not in QUOTAS:
            raise ProjectError(f"quotas takes {', '.join(QUOTAS)}; got {name!r}", f"quotas.{name}", "unknown_parameter")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ProjectError(f"quotas.{name} must be a positive integer or null (no limit)", f"quotas.{name}")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int)
                               or not 1 <= weight <= MAX_WEIGHT):
        raise ProjectError(f"weight must be an integer from 1 to {MAX_WEIGHT}", "weight")
    with db.session() as session:
        project = session.get(Project, project_id)
        if project is None:
            raise ProjectNotFound(f"No project with id '{project_id}'", "project_id")
        for name, value in quotas.items():
            setattr(project, name, value)
        if weight is not None:
            project.weight = weight
    return project

