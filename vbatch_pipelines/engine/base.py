"""What every inference engine offers the batch runner and the REST front door."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class EngineResponse:
    """An OpenAI response: 200 with a completion body, or an error status with ``{"error": ...}``."""

    status_code: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status_code == 200


EngineBackend = Literal["auto", "vllm", "transformers"]


class EngineUnavailable(RuntimeError):
    """The engine could not answer (down, restarting, overloaded): retry, never a request's fault."""


class Engine(Protocol):
    backend: str
    model_id: str

    async def request(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        """Run one OpenAI request body against ``endpoint`` (e.g. ``/v1/chat/completions``)."""

    async def request_many(self, endpoint: str, bodies: list[dict[str, Any]]) -> list[EngineResponse]:
        """Run several bodies at once (a batch chunk); responses in the same order."""

    async def open_stream(self, endpoint: str, body: dict[str, Any]) -> EngineResponse | AsyncIterator[bytes]:
        """``stream: true``: server-sent event bytes as OpenAI sends them, or an error response."""

    async def recover(self) -> None:
        """Called after EngineUnavailable: bring the engine back (restart a dead server)."""

    async def aclose(self) -> None: ...
