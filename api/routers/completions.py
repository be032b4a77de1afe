"""Online inference: /v1/chat/completions, /v1/completions and /v1/responses (``stream: true`` as server-sent
events), /v1/embeddings, /v1/score and /v1/rerank, served by the same warm engines that batches use. A model that
cannot serve the endpoint (an embedding model asked to chat, or the reverse) is a 400 on ``model``. Score and
rerank are also at the paths vLLM serves them (``/score``, ``/rerank``, ``/v2/rerank``: ``vllm_paths``), by the
same handlers."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import EnginePool, get_engines
from api.errors import OpenAIError
from api.schemas import COMPLETION_STREAM
from vbatch_pipelines.engine.base import Engine, EngineResponse, EngineUnavailable
from vbatch_pipelines.models.registry import dimensions_error
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

router = APIRouter(tags=["inference"])
vllm_paths = APIRouter(tags=["inference"], include_in_schema=False)


async def serve_completion(endpoint: str, request, engines: EnginePool):
    await engines.check_length(request.model, request.max_new_tokens(0), endpoint, request.max_tokens_param)
    engine = await engines.get(request.model, endpoint)
    body = request.model_dump(exclude_unset=True)
    body["model"] = engine.model_id
    try:
        if request.stream:
            result = await engine.open_stream(endpoint, body)
            if isinstance(result, EngineResponse):
                return JSONResponse(result.body, status_code=result.status_code)
            return StreamingResponse(result, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        response = await engine.request(endpoint, body)
    except EngineUnavailable as exc:
        await engine.recover()
        raise EngineUnavailable(f"The engine is restarting; retry shortly ({exc})", type="server_error") from exc
    return JSONResponse(response.body, status_code=response.status_code)


async def serve_pooling(endpoint: str, request, engine: Engine):
    """One embeddings, score or rerank request on the model's engine (no streaming: one JSON answer)."""
    body = request.model_dump(exclude_unset=True)
    body["model"] = engine.model_id
    try:
        response = await engine.request(endpoint, body)
    except EngineUnavailable as exc:
        await engine.recover()
        raise EngineUnavailable(f"The engine is restarting; retry shortly ({exc})", type="server_error") from exc
    return JSONResponse(response.body, status_code=response.status_code)


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": COMPLETION_STREAM}})
async def chat_completions(request: ChatCompletionRequest, engines: EnginePool = Depends(get_engines)):
    return await serve_completion("/v1/chat/completions", request, engines)


@router.post("/completions", response_model=CompletionResponse, responses={200: {"content": COMPLETION_STREAM}})
async def completions(request: CompletionRequest, engines: EnginePool = Depends(get_engines)):
    return await serve_completion("/v1/completions", request, engines)


@router.post("/responses", response_model=ResponsesResponse, responses={200: {"content": COMPLETION_STREAM}})
async def responses(request: ResponsesRequest, engines: EnginePool = Depends(get_engines)):
    return await serve_completion("/v1/responses", request, engines)


@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(request: EmbeddingRequest, engines: EnginePool = Depends(get_engines)):
    endpoint = "/v1/embeddings"
    engine = await engines.get(request.model, endpoint)
    if request.dimensions is not None:  # the same check and words on every engine and in batches
        problem = dimensions_error(engines.registry.lookup(engine.model_id), request.dimensions)
        if problem:
            raise OpenAIError(400, problem, param="dimensions", code="invalid_value")
    return await serve_pooling(endpoint, request, engine)


@router.post("/score", response_model=ScoreResponse)
async def score(request: ScoreRequest, engines: EnginePool = Depends(get_engines)):
    endpoint = "/v1/score"
    return await serve_pooling(endpoint, request, await engines.get(request.model, endpoint))


@router.post("/rerank", response_model=RerankResponse)
async def rerank(request: RerankRequest, engines: EnginePool = Depends(get_engines)):
    endpoint = "/v1/rerank"
    return await serve_pooling(endpoint, request, await engines.get(request.model, endpoint))


vllm_paths.add_api_route("/score", score, methods=["POST"], response_model=ScoreResponse)
for path in ("/rerank", "/v2/rerank"):
    vllm_paths.add_api_route(path, rerank, methods=["POST"], response_model=RerankResponse)
