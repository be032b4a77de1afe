"""Online inference: /v1/chat/completions, /v1/completions and /v1/responses (``stream: true`` as server-sent
events), /v1/embeddings, /v1/score and /v1/rerank, served by the same warm engines that batches use. A model that
cannot serve the endpoint (an embedding model asked to chat, or the reverse) is a 400 on ``model``. Score and
rerank are also at the paths vLLM serves them (``/score``, ``/rerank``, ``/v2/rerank``: ``vllm_paths``), by the
same handlers."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import EnginePool, get_caller, get_engines
from api.errors import OpenAIError
from api.schemas import COMPLETION_STREAM
from vbatch_pipelines.engine.base import Engine, EngineResponse, EngineUnavailable
from vbatch_pipelines.models.registry import dimensions_error
from vbatch_pipelines.projects import Caller
from vbatch_pipelines.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    RerankRequest,
    RerankResponse,
    ResponsesRequest,
    ResponsesResponse,
    ScoreRequest,
    ScoreResponse,
)
from vbatch_pipelines.quotas import TokenBudget
from vbatch_pipelines.usage import OnlineUsage

router = APIRouter(tags=["inference"])


async def get_budget(request: Request) -> TokenBudget:
    """Online usage: counted per project and key, and held to the project's tokens-per-day quota."""
    return request.app.state.token_budget

vllm_paths = APIRouter(tags=["inference"], include_in_schema=False)


def _count(usage: OnlineUsage, caller: Caller, engine: Engine, endpoint: str, body, started: float) -> None:
    """The request's usage, for its project and key (its tokens from the answer's ``usage``)."""
    usage.add(caller.project_id, caller.key_id or caller.key_name, engine.model_id, endpoint, body,
              time.monotonic() - started)


async def serve_completion(endpoint: str, request, engines: EnginePool, caller: Caller, budget: TokenBudget):
    headers = await asyncio.to_thread(budget.check, caller.project_id)  # may read the DB
    await engines.check_length(request.model, request.max_new_tokens(0), endpoint, request.max_tokens_param,
                               caller.project_id)
    engine = await engines.get(request.model, endpoint, caller.project_id)
    body = request.model_dump(exclude_unset=True)
    body["model"] = engine.model_id
    started = time.monotonic()
    try:
        if request.stream:
            result = await engine.open_stream(endpoint, body)
            if isinstance(result, EngineResponse):
                return JSONResponse(result.body, status_code=result.status_code, headers=headers)
            counted = _counted_stream(result, lambda last: _count(budget.usage, caller, engine, endpoint, last, started))
            return StreamingResponse(counted, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **headers})
        response = await engine.request(endpoint, body)
    except EngineUnavailable as exc:
        await engine.recover()
        raise EngineUnavailable(f"The engine is restarting; retry shortly ({exc})", type="server_error") from exc
    if response.ok:
        _count(budget.usage, caller, engine, endpoint, response.body, started)
    return JSONResponse(response.body, status_code=response.status_code, headers=headers)


async def _counted_stream(chunks, counted):
    """The stream as it comes, and its usage counted at its end: the last event that carries ``usage`` (with
    ``stream_options.include_usage``, or a Responses stream's ``response.completed``) gives the tokens."""
    last = None
    async for chunk in chunks:
        if b'"usage"' in chunk if isinstance(chunk, bytes) else '"usage"' in chunk:
            text = chunk.decode() if isinstance(chunk, bytes) else chunk
            for line in text.splitlines():
                if line.startswith("data: {"):
                    try:
                        event = json.loads(line[6:])
                    except ValueError:
                        continue
                    event = event.get("response", event) if isinstance(event, dict) else {}
                    if isinstance(event, dict) and event.get("usage"):
                        last = event
        yield chunk
    counted(last)


async def serve_pooling(endpoint: str, request, engine: Engine, caller: Caller, budget: TokenBudget):
    """One embeddings, score or rerank request on the model's engine (no streaming: one JSON answer)."""
    headers = await asyncio.to_thread(budget.check, caller.project_id)  # may read the DB
    body = request.model_dump(exclude_unset=True)
    body["model"] = engine.model_id
    started = time.monotonic()
    try:
        response = await engine.request(endpoint, body)
    except EngineUnavailable as exc:
        await engine.recover()
        raise EngineUnavailable(f"The engine is restarting; retry shortly ({exc})", type="server_error") from exc
    if response.ok:
        _count(budget.usage, caller, engine, endpoint, response.body, started)
    return JSONResponse(response.body, status_code=response.status_code, headers=headers)


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": COMPLETION_STREAM}})
async def chat_completions(request: ChatCompletionRequest, engines: EnginePool = Depends(get_engines),
        caller: Caller = Depends(get_caller), budget: TokenBudget = Depends(get_budget)):
    return await serve_completion("/v1/chat/completions", request, engines, caller, budget)


@router.post("/completions", response_model=CompletionResponse, responses={200: {"content": COMPLETION_STREAM}})
async def completions(request: CompletionRequest, engines: EnginePool = Depends(get_engines),
        caller: Caller = Depends(get_caller), budget: TokenBudget = Depends(get_budget)):
    return await serve_completion("/v1/completions", request, engines, caller, budget)


@router.post("/responses", response_model=ResponsesResponse, responses={200: {"content": COMPLETION_STREAM}})
async def responses(request: ResponsesRequest, engines: EnginePool = Depends(get_engines),
        caller: Caller = Depends(get_caller), budget: TokenBudget = Depends(get_budget)):
    return await serve_completion("/v1/responses", request, engines, caller, budget)


@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(request: EmbeddingRequest, engines: EnginePool = Depends(get_engines),
        caller: Caller = Depends(get_caller), budget: TokenBudget = Depends(get_budget)):
    endpoint = "/v1/embeddings"
    engine = await engines.get(request.model, endpoint, caller.project_id)
    if request.dimensions is not None:  # the same check and words on every engine and in batches
        problem = dimensions_error(engines.registry.lookup(engine.model_id), request.dimensions)
        if problem:
            raise OpenAIError(400, problem, param="dimensions", code="invalid_value")
    return await serve_pooling(endpoint, request, engine, caller, budget)


@router.post("/score", response_model=ScoreResponse)
async def score(request: ScoreRequest, engines: EnginePool = Depends(get_engines),
        caller: Caller = Depends(get_caller), budget: TokenBudget = Depends(get_budget)):
    endpoint = "/v1/score"
    return await serve_pooling(endpoint, request, await engines.get(request.model, endpoint, caller.project_id),
                               caller, budget)


@router.post("/rerank", response_model=RerankResponse)
async def rerank(request: RerankRequest, engines: EnginePool = Depends(get_engines),
        caller: Caller = Depends(get_caller), budget: TokenBudget = Depends(get_budget)):
    endpoint = "/v1/rerank"
    return await serve_pooling(endpoint, request, await engines.get(request.model, endpoint, caller.project_id),
                               caller, budget)


vllm_paths.add_api_route("/score", score, methods=["POST"], response_model=ScoreResponse)
for path in ("/rerank", "/v2/rerank"):
    vllm_paths.add_api_route(path, rerank, methods=["POST"], response_model=RerankResponse)
