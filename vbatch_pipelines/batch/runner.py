"""Run a validated batch on an engine: bounded concurrency, results on disk as they finish, resumable.

Each finished request is appended to the output JSONL (success) or the error JSONL (the engine refused
it) and flushed at once, so a killed or cancelled run loses only requests still in flight. A new run
first reads both files, drops a torn last line, and skips every custom_id already there: nothing is
redone, nothing is written twice.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vbatch_pipelines.engine.base import Engine, EngineResponse, EngineUnavailable, Share


@dataclass
class BatchProgress:
    total: int
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    done_before: int = 0
    completion_tokens_before: int = 0
    copied: int = 0  # lines answered with an identical line's response (batch.schedule), not by the engine
    copied_prompt_tokens: int = 0
    copied_completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.completed + self.failed

    def add_usage(self, body: dict[str, Any]) -> tuple[int, int]:
        """A response's tokens: ``prompt_tokens``/``completion_tokens``, or a Response's ``input_tokens``/
        ``output_tokens``; returns them."""
        usage = body.get("usage") or {}
        prompt = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
        completion = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        return prompt, completion

    def record(self, ok: bool, body: dict[str, Any] | None, *, copied: bool = False) -> None:
        """One finished line: completed with ``body`` (its usage counted) or failed; ``copied`` when its answer
        is another line's (its tokens also counted as copied)."""
        if not ok:
            self.failed += 1
            return
        self.completed += 1
        prompt, completion = self.add_usage(body or {})
        if copied:
            self.copied += 1
            self.copied_prompt_tokens += prompt
            self.copied_completion_tokens += completion


class FinishedIds:
    """The custom_ids a batch's result files already hold, as Arrow strings: a run resuming half of a
    1,000,000-request batch held them as a Python set, ~90 bytes each (45 MB at the run worker's peak); here
    each is its bytes and an offset. ``to_run`` selects a row group's rows still to run."""

    CHUNK = 50_000  # custom_ids turned into Arrow at a time while the files are read

    def __init__(self, chunks: list | None = None):
        import pyarrow as pa

        self.ids = pa.chunked_array(chunks or [], pa.string()).combine_chunks()

    @staticmethod
    def array(ids: list[str]):
        import pyarrow as pa

        return pa.array(ids, pa.string())

    @classmethod
    def of(cls, ids) -> FinishedIds:
        """``ids`` as FinishedIds (any iterable of custom_ids: a set in tests and callers that have one)."""
        return ids if isinstance(ids, FinishedIds) else cls([cls.array(list(ids))])

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        return iter(self.ids.to_pylist())

    def to_run(self, custom_ids):
        """A boolean mask over the Arrow array ``custom_ids`` (a row group's, unique): True where the row is not
        finished yet. The row group's ids are hashed and the finished ones looked up in them: hashing the
        finished ids instead cost a 500,000-entry hash table for every row group of a resumed run."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(custom_ids, pa.ChunkedArray):
            custom_ids = custom_ids.combine_chunks()
        positions = pc.index_in(self.ids, value_set=custom_ids).drop_null()
        mask = np.ones(len(custom_ids), dtype=bool)
        mask[positions.to_numpy()] = False
        return pa.array(mask)


ROWS_PER_SLICE = 4096  # rows of an Arrow table made Python objects at a time


def rows_of(table, *columns: str) -> Iterator[tuple]:
    """The rows of an Arrow table's ``columns`` as Python values, a slice at a time: a window of 50,000 requests
    as Python strings and tuples was half the run worker's memory."""
    for start in range(0, len(table), ROWS_PER_SLICE):
        part = table.slice(start, ROWS_PER_SLICE)
        yield from zip(*(part.column(name).to_pylist() for name in columns))


class ResultFiles:
    """The output and error JSONL files of one batch, append-only."""

    def __init__(self, directory: Path):
        self.output_path = directory / "output.jsonl"
        self.error_path = directory / "errors.jsonl"
        # custom_ids whose line is a copy of an identical line's (batch.schedule), one per line, each written
        # after its copy: a resumed run counts them as copies again.
        self.copies_path = directory / "copies.txt"
        self._copies = None
        directory.mkdir(parents=True, exist_ok=True)
        self._output = None
        self._errors = None
        # Line and request ids: 32 hex digits as before, a random half per instance and a counter (a uuid4 per
        # id drew from the kernel's entropy twice per result: a tenth of a small batch's run-worker time).
        self._prefix, self._serial = uuid.uuid4().hex[:16], itertools.count()

    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._serial):016x}"

    @staticmethod
    def _scan(path: Path, progress: BatchProgress | None, ok: bool, copies: set[str] = frozenset()) -> list:
        """The custom_ids already in ``path`` (Arrow arrays); truncates a torn last line left by a killed run."""
        chunks: list = []
        if not path.exists():
            return chunks
        ids: list[str] = []
        good_bytes = 0
        with open(path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    line = json.loads(raw)
                except ValueError:
                    break
                good_bytes += len(raw)
                ids.append(line["custom_id"])
                if len(ids) >= FinishedIds.CHUNK:
                    chunks.append(FinishedIds.array(ids))
                    ids = []
                if progress is not None:
                    progress.record(ok, line["response"]["body"] if ok else None,
                                    copied=line["custom_id"] in copies)
        chunks.append(FinishedIds.array(ids))
        if good_bytes != path.stat().st_size:
            with open(path, "r+b") as f:
                f.truncate(good_bytes)
        return chunks

    def resume(self, progress: BatchProgress | None = None) -> FinishedIds:
        copies = set(self.copies_path.read_text().split()) if self.copies_path.exists() else set()
        done = FinishedIds(self._scan(self.output_path, progress, True, copies)
                           + self._scan(self.error_path, progress, False))
        if progress is not None:
            progress.done_before = len(done)
            progress.completion_tokens_before = progress.completion_tokens
        return done

    def _append(self, handle_name: str, path: Path, line: dict[str, Any]) -> None:
        handle = getattr(self, handle_name)
        if handle is None:
            handle = open(path, "ab")
            setattr(self, handle_name, handle)
        handle.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
        handle.flush()

    def write(self, custom_id: str, response: EngineResponse, *, copy: bool = False) -> None:
        """The line of a request the engine answered, or of an identical line's copy of that answer (``copy``)."""
        line = {
            "id": f"batch_req_{self._new_id()}",
            "custom_id": custom_id,
            "response": {"status_code": response.status_code, "request_id": self._new_id(),
                         "body": response.body},
            "error": None,
        }
        if response.ok:
            self._append("_output", self.output_path, line)
        else:
            self._append("_errors", self.error_path, line)
        if copy:
            if self._copies is None:
                self._copies = open(self.copies_path, "a")
            self._copies.write(custom_id + "\n")
            self._copies.flush()

    def write_error(self, custom_id: str, code: str, message: str) -> None:
        """A request that never reached the engine (batch expired or cancelled), OpenAI-style."""
        line = {"id": f"batch_req_{self._new_id()}", "custom_id": custom_id, "response": None,
                "error": {"code": code, "message": message}}
        self._append("_errors", self.error_path, line)

    def close(self) -> None:
        if self._copies is not None:
            self._copies.close()
            self._copies = None
        for name in ("_output", "_errors"):
            handle = getattr(self, name)
            if handle is not None:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                setattr(self, name, None)


# (custom_id, body), or a planned request with the custom_ids of identical lines its answer is copied to
RequestRow = tuple[str, dict[str, Any]] | tuple[str, dict[str, Any], list[str]]


async def run_batch_requests(
    engine: Engine,
    endpoint: str,
    requests: Iterator[RequestRow],
    results: ResultFiles,
    progress: BatchProgress,
    *,
    concurrency: int = 128,
    chunk_size: int = 16,
    stop: asyncio.Event | None = None,
    max_attempts: int = 5,
    share: Share | None = None,
) -> bool:
    """Run every request; returns False if ``stop`` was set before the end (finished results are kept).

    ``concurrency`` requests are in flight, sent to the engine in chunks of ``chunk_size`` (one HTTP call
    each on vLLM), so per-request overhead stays off the engine's critical path. Several batches may run on
    one engine at once, each with its own call of this function; ``share`` (project, weight) is whose the
    chunks are, for the engine's fair share among projects.
    """
    stop = stop or asyncio.Event()
    chunk_size = max(1, min(chunk_size, concurrency))

    async def attempt(bodies: list[dict[str, Any]]) -> list[EngineResponse]:
        """Every body's answer. The engine's own failures — the call failing, or a 5xx for one request inside
        a chunk (a server going down answers "cannot schedule new futures after shutdown") — are retried with
        back-off and never written as the request's error; after ``max_attempts`` the run fails and a new run
        resumes where this one stopped."""
        answers: list[EngineResponse | None] = [None] * len(bodies)
        waiting = list(range(len(bodies)))
        for n in range(1, max_attempts + 1):
            try:
                responses = await engine.request_many(endpoint, [bodies[i] for i in waiting], share)
                for i, response in zip(waiting, responses):
                    answers[i] = response
                waiting = [i for i in waiting if answers[i].status_code >= 500]
                if not waiting:
                    return answers  # type: ignore[return-value]
                failure = f"{len(waiting)} of {len(bodies)} requests answered {answers[waiting[0]].status_code}: " \
                          f"{answers[waiting[0]].body}"
            except EngineUnavailable as exc:
                failure = str(exc)
            if n == max_attempts:
                raise EngineUnavailable(f"the engine failed {max_attempts} times in a row; last: {failure}")
            await asyncio.sleep(min(2.0 ** n, 10.0))
            await engine.recover()
        raise AssertionError("unreachable")

    exhausted = asyncio.Event()  # every request was taken by a worker

    async def worker() -> None:
        while not stop.is_set():
            chunk = list(itertools.islice(requests, chunk_size))
            if not chunk:
                exhausted.set()
                return
            responses = await attempt([row[1] for row in chunk])
            for row, response in zip(chunk, responses):
                results.write(row[0], response)
                progress.record(response.ok, response.body)
                for copy in row[2] if len(row) > 2 else ():
                    results.write(copy, response, copy=True)
                    progress.record(response.ok, response.body, copied=True)

    workers = [asyncio.create_task(worker()) for _ in range(max(1, concurrency // chunk_size))]
    stopped = asyncio.create_task(stop.wait())
    pending = set(workers)
    try:
        while pending:
            done, pending = await asyncio.wait(pending | {stopped}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(stopped)
            for task in done - {stopped}:
                task.result()  # re-raise a worker's failure at once
            if stop.is_set():
                break
    finally:
        for task in workers + [stopped]:
            task.cancel()
        await asyncio.gather(*workers, stopped, return_exceptions=True)
    return exhausted.is_set() and not pending
