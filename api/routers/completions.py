"""Online inference: /v1/chat/completions and /v1/completions (``stream: true`` as server-sent events),
served by the same warm engines that batches use."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import EnginePool, get_engines
from api.errors import OpenAIError
from api.schemas import COMPLETION_STREAM
from vbatch_pipelines.engine.base import EngineResponse, EngineUnavailable
from vbatch_pipelines.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)

router = APIRouter(tags=["inference"])


async def serve_completion(endpoint: str, request, engines: EnginePool):
    await engines.check_length(request.model, request.max_new_tokens(0))
    engine = await engines.get(request.model)
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
        raise OpenAIError(503, f"The engine is restarting; retry shortly ({exc})", type="server_error",
                          code="engine_unavailable") from exc
    return JSONResponse(response.body, status_code=response.status_code)


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": COMPLETION_STREAM}})
async def chat_completions(request: ChatCompletionRequest, engines: EnginePool = Depends(get_engines)):
    return await serve_completion("/v1/chat/completions", request, engines)


@router.post("/completions", response_model=CompletionResponse, responses={200: {"content": COMPLETION_STREAM}})
async def completions(request: CompletionRequest, engines: EnginePool = Depends(get_engines)):
    return await serve_completion("/v1/completions", request, engines)
