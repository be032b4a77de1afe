"""One model served by several vLLM servers (replicas, on one node or many) behind the ``Engine`` interface the
batch runner and the online routes already use.

Each call goes to the replica with the fewest calls in flight. A replica that fails a call (it died, it is
restarting) is set aside and the same call is sent at once to another, so a batch loses nothing and runs on
while any replica answers; a chunk is answered whole by one replica, so no ``custom_id`` is answered twice.
Only when every replica failed does the caller see EngineUnavailable, and its ``recover()`` then asks for the
replicas again (restarting the one this node manages)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from vbatch_pipelines.engine.base import EngineResponse, EngineUnavailable, Share

log = logging.getLogger("vbatch.engine")


class ReplicatedEngine:
    backend = "vllm"

    def __init__(self, model_id: str, connect: Callable[[], list[Any]]):
        """``connect()`` opens an engine (``VLLMEngine``) on every replica that answers; it raises when none does."""
        self.model_id = model_id
        self._connect = connect
        self._replicas: list[Any] = connect()
        self._in_flight: dict[int, int] = {}

    @property
    def replicas(self) -> list[Any]:
        return list(self._replicas)

    @property
    def where(self) -> str:
        return f"{len(self._replicas)} replica(s): " + ", ".join(engine.url for engine in self._replicas)

    def _order(self) -> list[Any]:
        return sorted(self._replicas, key=lambda engine: self._in_flight.get(id(engine), 0))

    async def _call(self, method: str, *args: Any):
        failures = []
        for engine in self._order():
            key = id(engine)
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
            try:
                return await getattr(engine, method)(*args)
            except EngineUnavailable as exc:
                failures.append(exc)
                self._set_aside(engine, exc)
            finally:
                self._in_flight[key] -= 1
        if not failures:
            raise EngineUnavailable(f"no replica of {self.model_id} is answering")
        raise EngineUnavailable(f"every replica of {self.model_id} failed: {failures[-1]}") from failures[-1]

    def _set_aside(self, engine: Any, exc: Exception) -> None:
        if engine in self._replicas and len(self._replicas) > 1:
            self._replicas.remove(engine)
            log.warning("%s: a replica at %s failed (%s); %d left", self.model_id, engine.url, exc,
                        len(self._replicas))
            asyncio.get_running_loop().create_task(engine.aclose())
        engine.server.seen_down(str(exc))

    async def request(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        return await self._call("request", endpoint, body)

    async def request_many(self, endpoint: str, bodies: list[dict[str, Any]],
                           share: Share | None = None) -> list[EngineResponse]:
        return await self._call("request_many", endpoint, bodies, share)

    async def open_stream(self, endpoint: str, body: dict[str, Any]):
        return await self._call("open_stream", endpoint, body)

    async def recover(self) -> None:
        """Every replica asked again: one set aside may be back, a new one may have joined, the one this
        node manages is restarted if it died."""
        old = self._replicas
        self._replicas = await asyncio.to_thread(self._connect)
        for engine in old:
            await engine.aclose()

    async def aclose(self) -> None:
        for engine in self._replicas:
            await engine.aclose()
