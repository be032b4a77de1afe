"""Runs inside the managed vLLM server (loaded with vLLM's own ``--middleware`` flag): many requests per
HTTP call.

One HTTP round trip per request costs more CPU than the tiny model's generation on a small machine; vLLM's
``run-batch`` avoids it by calling the serving objects in-process. This route does the same inside the
warm server: ``POST /vbatch/v1/requests`` with ``{"endpoint", "requests": [body, ...]}`` runs every body
through vLLM's own chat, completion, Responses, embedding or score/rerank serving code concurrently (the
endpoint picks it, as run-batch's endpoint registry does) and answers ``{"results": [{"status_code", "body"}, ...]}``
in order, each body exactly what the single-request endpoint would have returned. Pooling responses come back
from vLLM as encoded JSON and are passed on as those bytes, never parsed and re-encoded (a vector is most of
a body). Imports nothing but vLLM and the standard library (it runs in vLLM's env).

Every batch on this server sends its chunks here, from whatever run or node: ``FairShare`` keeps at most
VBATCH_ENGINE_SLOTS chunks running and, when projects wait (``x-vbatch-project``, ``x-vbatch-weight`` headers),
hands each freed slot to the project running the fewest chunks for its weight; each request then carries a
vLLM priority (the server runs ``--scheduling-policy priority``) saying the same inside the engine's queue.
"""

import asyncio
import collections
import functools
import importlib
import json
import os

ROUTE = "/vbatch/v1/requests"
# The pooling endpoints: the app state's serving object for each, and vLLM's request type.
_POOLING = {
    "/v1/embeddings": ("serving_embedding", "vllm.entrypoints.pooling.embed.protocol", "EmbeddingRequest"),
    "/v1/score": ("serving_scores", "vllm.entrypoints.pooling.scoring.protocol", "ScoreRequest"),
    "/v1/rerank": ("serving_scores", "vllm.entrypoints.pooling.scoring.protocol", "RerankRequest"),
}


class FairShare:
    """The engine's in-flight chunks, shared among projects. At most ``slots`` chunks run at once, plus one for
    each project that had none running when it asked (it never waits); while chunks wait, a freed slot goes to
    the project running the fewest chunks for its weight (first come first served within a project), so another
    project's small batch runs at once, not after the large one. With one project alone it has every slot. Pure asyncio: the vLLM middleware and the in-process
    engines use it alike."""

    def __init__(self, slots: int):
        self.slots = max(1, slots)
        self.running: dict[str, int] = {}
        self.weights: dict[str, float] = {}
        self.waiting: dict[str, collections.deque] = {}
        self.granted: dict[str, int] = {}  # chunks each project was given (for the record and tests)
        self.passed_over: dict[str, int] = {}  # slots given to another project while this one had a chunk waiting

    @property
    def busy(self) -> int:
        return sum(self.running.values())

    async def acquire(self, project: str, weight: float = 1.0) -> int:
        """Wait for a slot; returns the chunk's priority in vLLM's queue (lower first): 1 plus the project's
        running chunks for its weight when it got the slot, so inside the engine too a project's first chunk
        goes ahead of another's fifth (online requests, at vLLM's default 0, ahead of every batch)."""
        self.weights[project] = max(weight, 1e-6)
        if (self.busy < self.slots and not any(self.waiting.values())) or not self.running.get(project):
            # A project with nothing running starts one chunk at once, over the limit if need be: a small batch
            # never waits for another project's chunk to end (its priority puts it first in vLLM's queue too).
            return self._grant(project)
        future = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(project, collections.deque()).append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted as it was cancelled: give the slot back
                self.release(project)
            else:
                self.waiting[project].remove(future)
            raise

    def _grant(self, project: str) -> int:
        priority = 1 + int(PRIORITY_STEP * self.running.get(project, 0) / self.weights.get(project, 1.0))
        self.running[project] = self.running.get(project, 0) + 1
        self.granted[project] = self.granted.get(project, 0) + 1
        return priority

    def release(self, project: str) -> None:
        self.running[project] = max(0, self.running.get(project, 0) - 1)
        while self.busy < self.slots:
            queued = [p for p, q in self.waiting.items() if q]
            if not queued:
                return
            turn = min(queued, key=lambda p: (self.running.get(p, 0) / self.weights.get(p, 1.0),
                                              self.granted.get(p, 0) / self.weights.get(p, 1.0)))
            future = self.waiting[turn].popleft()
            if future.cancelled():
                continue
            for other in queued:
                if other != turn:
                    self.passed_over[other] = self.passed_over.get(other, 0) + 1
            future.set_result(self._grant(turn))


PROJECT_HEADER, WEIGHT_HEADER = "x-vbatch-project", "x-vbatch-weight"
PRIORITY_STEP = 1000  # a running chunk's weight in a request's vLLM priority
_share: list[FairShare] = []  # this server's, made on its first chunk (in its event loop)


def fair_share() -> FairShare:
    if not _share:
        _share.append(FairShare(int(os.environ.get("VBATCH_ENGINE_SLOTS") or 8)))
    return _share[0]


def share_of(headers) -> tuple[str, float]:
    """(project, weight) a chunk says it is for; no headers: one shared anonymous project of weight 1."""
    try:
        weight = float(headers.get(WEIGHT_HEADER) or 1.0)
    except ValueError:
        weight = 1.0
    return (headers.get(PROJECT_HEADER) or "")[:64], min(max(weight, 0.01), 100.0)


def _error(status: int, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error": {
        "message": message, "type": "BadRequestError" if status < 500 else "InternalServerError",
        "param": None, "code": status}}).encode()


def _dump(model) -> bytes:
    return json.dumps(model.model_dump(), separators=(",", ":")).encode()


def _dump_by_alias(model) -> bytes:
    """As vLLM's /v1/responses encodes a Response: JSON values, fields by their aliases (``text.format.schema``)."""
    return json.dumps(model.model_dump(mode="json", by_alias=True), separators=(",", ":")).encode()


async def _run_one(handler, validate, error_type, dump, body: dict) -> tuple[int, bytes]:
    """(status, encoded body) of one request."""
    from starlette.responses import Response
    from vllm.entrypoints.serve import create_error_response

    try:
        request = validate(body)
    except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError and value errors alike
        return _error(400, str(exc))
    try:
        response = await handler(request, None)
    except Exception as exc:  # noqa: BLE001 - per request, mapped to a status as run-batch does
        response = create_error_response(exc)
    if isinstance(response, error_type):
        return response.error.code, dump(response)
    if isinstance(response, Response) and not hasattr(response, "body_iterator"):
        return response.status_code, bytes(response.body)  # the pooling servers' JSON, as encoded
    if hasattr(response, "model_dump"):
        return 200, dump(response)
    return _error(400, "streaming is not supported in batches")


@functools.cache
def _pooling_validator(endpoint: str):
    """Validates a body as vLLM's request type for a pooling endpoint; built once per endpoint (a TypeAdapter
    over vLLM's request unions is not free)."""
    from pydantic import TypeAdapter

    _, module, name = _POOLING[endpoint]
    return TypeAdapter(getattr(importlib.import_module(module), name)).validate_python


def _serving(state, endpoint):
    """(handler, validate, error type, dump) of ``endpoint`` on this server, or None when it does not serve it
    (a pooling server has no chat, a generating one no embeddings or scores)."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if endpoint == "/v1/chat/completions" and getattr(state, "openai_serving_chat", None) is not None:
        from vllm.entrypoints.openai.chat_completion import api_router as chat

        return (state.openai_serving_chat.create_chat_completion, chat.ChatCompletionRequest.model_validate,
                ErrorResponse, _dump)
    if endpoint == "/v1/completions" and getattr(state, "openai_serving_completion", None) is not None:
        from vllm.entrypoints.openai.completion import api_router as completion

        return (state.openai_serving_completion.create_completion, completion.CompletionRequest.model_validate,
                ErrorResponse, _dump)
    if endpoint == "/v1/responses" and getattr(state, "openai_serving_responses", None) is not None:
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

        return (state.openai_serving_responses.create_responses, ResponsesRequest.model_validate, ErrorResponse,
                _dump_by_alias)
    serving = getattr(state, _POOLING[endpoint][0], None) if endpoint in _POOLING else None
    if serving is not None:
        return serving, _pooling_validator(endpoint), ErrorResponse, _dump
    return None


SHARE_ROUTE = "/vbatch/v1/share"


async def batch_requests(request, call_next):
    from starlette.responses import Response

    if request.url.path == SHARE_ROUTE and request.method == "GET":  # who runs and waits now (tests, operators)
        share = fair_share()
        state = {"slots": share.slots, "running": share.running, "granted": share.granted,
                 "passed_over": share.passed_over,
                 "waiting": {project: len(queue) for project, queue in share.waiting.items()}}
        return Response(json.dumps(state), media_type="application/json")
    if request.url.path != ROUTE or request.method != "POST":
        return await call_next(request)

    payload = json.loads(await request.body())
    serving = _serving(request.app.state, payload.get("endpoint"))
    if serving is None:  # each request's own error, as run-batch answers a model without the endpoint
        refusal = _error(400, f"The model does not support the endpoint {payload.get('endpoint')!r}")
        results = [refusal] * len(payload["requests"])
    else:
        project, weight = share_of(request.headers)
        share = fair_share()
        priority = await share.acquire(project, weight)
        try:
            results = await asyncio.gather(*(_run_one(*serving, {**body, "priority": priority})
                                             for body in payload["requests"]))
        finally:
            share.release(project)
    content = b'{"results":[' + b",".join(b'{"status_code":%d,"body":%s}' % (status, body)
                                          for status, body in results) + b"]}"
    return Response(content, media_type="application/json")
