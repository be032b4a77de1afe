"""Runs inside the managed vLLM server (loaded with vLLM's own ``--middleware`` flag): many requests per
HTTP call.

One HTTP round trip per request costs more CPU than the tiny model's generation on a small machine; vLLM's
``run-batch`` avoids it by calling the serving objects in-process. This route does the same inside the
warm server: ``POST /vbatch/v1/requests`` with ``{"endpoint", "requests": [body, ...]}`` runs every body
through vLLM's own chat/completion serving code concurrently and answers
``{"results": [{"status_code", "body"}, ...]}`` in order, each body exactly what the single-request
endpoint would have returned. Imports nothing but vLLM and the standard library (it runs in vLLM's env).
"""

import asyncio
import json

ROUTE = "/vbatch/v1/requests"


def _error(status: int, message: str) -> dict:
    return {"status_code": status,
            "body": {"error": {"message": message, "type": "BadRequestError" if status < 500 else "InternalServerError",
                               "param": None, "code": status}}}


async def _run_one(handler, request_type, error_type, body: dict) -> dict:
    from vllm.entrypoints.serve import create_error_response

    try:
        request = request_type.model_validate(body)
    except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError and value errors alike
        return _error(400, str(exc))
    try:
        response = await handler(request, None)
    except Exception as exc:  # noqa: BLE001 - per request, mapped to a status as run-batch does
        response = create_error_response(exc)
    if isinstance(response, error_type):
        return {"status_code": response.error.code, "body": response.model_dump()}
    if hasattr(response, "model_dump"):
        return {"status_code": 200, "body": response.model_dump()}
    return _error(400, "streaming is not supported in batches")


async def batch_requests(request, call_next):
    if request.url.path != ROUTE or request.method != "POST":
        return await call_next(request)
    from starlette.responses import Response
    from vllm.entrypoints.openai.chat_completion import api_router as chat
    from vllm.entrypoints.openai.completion import api_router as completion

    payload = json.loads(await request.body())
    state = request.app.state
    if payload.get("endpoint") == "/v1/chat/completions":
        handler = state.openai_serving_chat.create_chat_completion
        request_type, error_type = chat.ChatCompletionRequest, chat.ErrorResponse
    elif payload.get("endpoint") == "/v1/completions":
        handler = state.openai_serving_completion.create_completion
        request_type, error_type = completion.CompletionRequest, completion.ErrorResponse
    else:
        return Response(json.dumps({"error": {"message": f"unsupported endpoint {payload.get('endpoint')!r}"}}),
                        status_code=400, media_type="application/json")
    results = await asyncio.gather(*(_run_one(handler, request_type, error_type, body)
                                     for body in payload["requests"]))
    return Response(json.dumps({"results": results}, separators=(",", ":")), media_type="application/json")
