"""What every inference engine offers the batch runner and the REST front door."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from vbatch_pipelines.errors import Unavailable


@dataclass(frozen=True)
class EngineResponse:
    """An OpenAI response: 200 with a completion body, or an error status with ``{"error": ...}``."""

    status_code: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status_code == 200


EngineBackend = Literal["auto", "vllm", "transformers"]


class EngineUnavailable(Unavailable):
    """The engine could not answer (down, restarting, overloaded): retry, never a request's fault."""

    code = "engine_unavailable"


Share = tuple[str, float]  # (project id, its weight): whose a chunk is, for the engine's fair share


class Engine(Protocol):
    backend: str
    model_id: str
    where: str  # where it runs, for run logs: "in this process", or the servers' URLs

    async def request(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        """Run one OpenAI request body against ``endpoint`` (e.g. ``/v1/chat/completions``)."""

    async def request_many(self, endpoint: str, bodies: list[dict[str, Any]],
                           share: Share | None = None) -> list[EngineResponse]:
        """Run several bodies at once (a batch chunk); responses in the same order. ``share`` says whose chunk
        it is, (project, weight): a server shared by several runs gives projects fair turns (the vLLM
        middleware's FairShare); an in-process engine serves one run and ignores it."""

    async def open_stream(self, endpoint: str, body: dict[str, Any]) -> EngineResponse | AsyncIterator[bytes]:
        """``stream: true``: server-sent event bytes as OpenAI sends them, or an error response."""

    async def recover(self) -> None:
        """Called after EngineUnavailable: bring the engine back (restart a dead server)."""

    async def aclose(self) -> None: ...


class MicroBatching:
    """For in-process engines: concurrent requests queue up as jobs (each with a ``future``) and one worker
    takes what arrived within 2 ms as one micro-batch, so a batch still runs at batch speed."""

    _queue: asyncio.Queue | None = None
    _worker: asyncio.Task | None = None

    async def _enqueue(self, job: Any) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work())
        await self._queue.put(job)

    async def _work(self) -> None:
        raise NotImplementedError

    async def _gather(self, full: Callable[[list], bool]) -> list:
        """The next micro-batch: the first job waiting, and those that joined it, until ``full(jobs)``."""
        assert self._queue is not None
        jobs = [await self._queue.get()]
        await asyncio.sleep(0.002)  # let concurrent callers join this micro-batch
        while not self._queue.empty() and not full(jobs):
            jobs.append(self._queue.get_nowait())
        return jobs

    @staticmethod
    def _settle(jobs: Sequence[Any], results: Sequence[Any] | None = None, error: BaseException | None = None) -> None:
        """Hand each waiting caller its result, or every one of them the failure."""
        for index, job in enumerate(jobs):
            if not job.future.done():
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(results[index])

    async def recover(self) -> None:
        return None

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
            self._queue = None
