"""Usage per project: requests, input and output tokens and engine seconds, batch and online, by the minute.

A batch's usage is recorded once, in the transaction that ends it (so the usage API's sums are the batches' own
``usage``); online requests are summed in memory per minute, key, model and kind and written every few seconds
(``OnlineUsage``). ``usage_page`` answers ``GET /v1/organization/usage/{completions,embeddings}`` in OpenAI's
shape: buckets of a minute, an hour or a day, grouped by project, key, model (and batch for completions).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from sqlalchemy import func, select

from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.protocol import POOLING_ENDPOINTS  # input tokens only: counted as embeddings
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import Batch, UsageRecord

COMPLETIONS, EMBEDDINGS = "completions", "embeddings"
BUCKET_SECONDS = {"1m": 60, "1h": 3600, "1d": 86400}
DEFAULT_BUCKETS = {"1m": 60, "1h": 24, "1d": 7}  # OpenAI's defaults and limits per page
MAX_BUCKETS = {"1m": 1440, "1h": 168, "1d": 31}
GROUPS = {COMPLETIONS: ("project_id", "api_key_id", "model", "batch"), EMBEDDINGS: ("project_id", "api_key_id", "model")}


class UsageQueryError(VbatchError):
    code = "invalid_value"


def kind_of(endpoint: str) -> str:
    return EMBEDDINGS if endpoint in POOLING_ENDPOINTS else COMPLETIONS


def minute_of(stamp: float) -> int:
    return int(stamp) // 60 * 60


def batch_usage(batch: Batch, ended_at: int) -> UsageRecord:
    """The usage of a batch that just ended: its requests, its tokens, and the seconds from when it started
    running to its end (the time its requests held the engine)."""
    usage = batch.usage or {}
    started = batch.in_progress_at or batch.created_at
    return UsageRecord(minute=minute_of(ended_at), kind=kind_of(batch.endpoint), project_id=batch.project_id,
                       api_key_id=batch.created_by, model=batch.model, batch=True,
                       requests=(batch.request_completed or 0) + (batch.request_failed or 0),
                       input_tokens=int(usage.get("input_tokens") or 0),
                       output_tokens=int(usage.get("output_tokens") or 0),
                       input_cached_tokens=int((usage.get("input_tokens_details") or {}).get("cached_tokens") or 0),
                       engine_seconds=float(max(0, ended_at - started)) if batch.in_progress_at else 0.0,
                       batch_id=batch.id)


def usage_of(body: dict[str, Any] | bytes | None) -> dict[str, Any]:
    """An answer's ``usage`` object: from the parsed body, or from the encoded JSON a pooling engine passes on
    (only its ``"usage"`` object is decoded: the vectors before it are most of the body)."""
    if isinstance(body, dict):
        return body.get("usage") or {}
    if isinstance(body, (bytes, bytearray)):
        at = body.rfind(b'"usage"')
        start = body.find(b"{", at) if at >= 0 else -1
        if start >= 0:
            try:
                found, _ = json.JSONDecoder().raw_decode(body[start:].decode())
            except ValueError:
                return {}
            return found if isinstance(found, dict) else {}
    return {}


class OnlineUsage:
    """Online requests' usage, summed per (minute, kind, project, key, model) and written by ``flush`` (the API
    calls it every few seconds and at shutdown): one insert per minute and key, not one per request."""

    def __init__(self) -> None:
        self._sums: dict[tuple, list[float]] = {}
        self._lock = threading.Lock()

    def add(self, project_id: str, api_key_id: str | None, model: str | None, endpoint: str,
            body: dict[str, Any] | bytes | None, seconds: float) -> None:
        usage = usage_of(body)
        tokens_in = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
        tokens_out = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
        key = (minute_of(time.time()), kind_of(endpoint), project_id, api_key_id, model)
        with self._lock:
            sums = self._sums.setdefault(key, [0, 0, 0, 0.0])
            sums[0] += 1
            sums[1] += tokens_in
            sums[2] += tokens_out
            sums[3] += seconds

    def pending_tokens(self, project_id: str) -> int:
        """Tokens counted for the project and not yet written (the quota adds them to what the DB says)."""
        with self._lock:
            return int(sum(sums[1] + sums[2] for key, sums in self._sums.items() if key[2] == project_id))

    def flush(self, db: Database) -> int:
        """Write what was summed since the last flush; returns the rows written. A failed write keeps the sums
        for the next flush."""
        with self._lock:
            taken, self._sums = self._sums, {}
        if not taken:
            return 0
        try:
            with db.session() as session:
                session.add_all(UsageRecord(minute=minute, kind=kind, project_id=project, api_key_id=key, model=model,
                                            batch=False, requests=int(n), input_tokens=int(tokens_in),
                                            output_tokens=int(tokens_out), engine_seconds=round(seconds, 3))
                                for (minute, kind, project, key, model), (n, tokens_in, tokens_out, seconds)
                                in taken.items())
        except Exception:
            with self._lock:  # put them back: summed into whatever arrived meanwhile
                for key, sums in taken.items():
                    into = self._sums.setdefault(key, [0, 0, 0, 0.0])
                    for i, value in enumerate(sums):
                        into[i] += value
            raise
        return len(taken)


def tokens_since(db: Database, project_id: str, since: int) -> int:
    """Input and output tokens the project used since ``since`` (Unix seconds), batch and online (written)."""
    with db.session() as session:
        return int(session.scalar(select(func.coalesce(func.sum(UsageRecord.input_tokens + UsageRecord.output_tokens),
                                                       0))
                                  .where(UsageRecord.project_id == project_id,
                                         UsageRecord.minute >= minute_of(since))) or 0)


def usage_page(db: Database, kind: str, *, start_time: int, end_time: int | None = None, bucket_width: str = "1d",
               group_by: list[str] | None = None, project_ids: list[str] | None = None,
               api_key_ids: list[str] | None = None, models: list[str] | None = None, batch: bool | None = None,
               limit: int | None = None, page: str | None = None) -> dict[str, Any]:
    """One page of usage buckets, OpenAI's ``page`` of ``bucket`` objects: every bucket in the range (empty ones
    too), each with a result per group (fields not grouped by are null). ``page`` is the ``next_page`` of the
    previous answer."""
    if bucket_width not in BUCKET_SECONDS:
        raise UsageQueryError(f"bucket_width must be one of {', '.join(BUCKET_SECONDS)}", "bucket_width")
    width = BUCKET_SECONDS[bucket_width]
    group_by = list(dict.fromkeys(group_by or []))
    unknown = [g for g in group_by if g not in GROUPS[kind]]
    if unknown:
        raise UsageQueryError(f"group_by takes {', '.join(GROUPS[kind])}; got {unknown[0]!r}", "group_by")
    limit = limit or DEFAULT_BUCKETS[bucket_width]
    if not 1 <= limit <= MAX_BUCKETS[bucket_width]:
        raise UsageQueryError(f"limit must be between 1 and {MAX_BUCKETS[bucket_width]} for bucket_width "
                              f"{bucket_width}", "limit")
    if start_time < 0 or (end_time is not None and end_time <= start_time):
        raise UsageQueryError("start_time must be before end_time (Unix seconds)", "start_time")
    first = start_time // width * width
    if page is not None:
        if not page.isdigit() or int(page) < first or (int(page) - first) % width:
            raise UsageQueryError(f"page: {page[:64]!r} is not a next_page of this query", "page")
        first = int(page)
    end = end_time if end_time is not None else int(time.time()) + 1
    last = min(end, first + limit * width)  # this page's buckets: [first, last)

    bucket = UsageRecord.minute // width * width
    columns = [getattr(UsageRecord, g) for g in group_by]
    sums = [func.sum(UsageRecord.input_tokens), func.sum(UsageRecord.output_tokens), func.sum(UsageRecord.requests),
            func.sum(UsageRecord.engine_seconds), func.sum(UsageRecord.input_cached_tokens)]
    query = (select(bucket, *columns, *sums)
             .where(UsageRecord.kind == kind, UsageRecord.minute >= max(start_time // 60 * 60, first),
                    UsageRecord.minute < last)
             .group_by(bucket, *columns))
    if project_ids:
        query = query.where(UsageRecord.project_id.in_(project_ids))
    if api_key_ids:
        query = query.where(UsageRecord.api_key_id.in_(api_key_ids))
    if models:
        query = query.where(UsageRecord.model.in_(models))
    if batch is not None and kind == COMPLETIONS:
        query = query.where(UsageRecord.batch.is_(batch))
    results: dict[int, list[dict[str, Any]]] = {}
    with db.session() as session:
        for row in session.execute(query):
            start, groups, (tokens_in, tokens_out, requests, seconds, cached) = int(row[0]), \
                row[1:1 + len(columns)], row[1 + len(columns):]
            result = {"object": f"organization.usage.{kind}.result", "input_tokens": int(tokens_in or 0),
                      "num_model_requests": int(requests or 0), "project_id": None, "user_id": None,
                      "api_key_id": None, "model": None, "engine_seconds": round(float(seconds or 0), 3)}
            if kind == COMPLETIONS:
                result.update(output_tokens=int(tokens_out or 0), input_cached_tokens=int(cached or 0), input_audio_tokens=0,
                              output_audio_tokens=0, batch=None, service_tier=None)
            result.update({g: (bool(v) if g == "batch" else v) for g, v in zip(group_by, groups)})
            results.setdefault(start, []).append(result)
    data = [{"object": "bucket", "start_time": at, "end_time": at + width, "results": results.get(at, [])}
            for at in range(first, last, width)]
    more = last < end
    return {"object": "page", "data": data, "has_more": more, "next_page": str(last) if more else None}
