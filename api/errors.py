"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the right status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vbatch_pipelines.protocol import error_body

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, type=self.type, param=self.param, code=self.code),
                            status_code=self.status)


def not_found(kind: str, identifier: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(404, f"No {kind} found with id '{identifier}'.", param=param, code=f"{kind}_not_found")


def get_or_404(db, model, key: str, kind: str, param: str):
    """The ``model`` row with primary key ``key``, or a 404 in OpenAI's shape naming ``kind``."""
    row = db.get(model, key)
    if row is None:
        raise not_found(kind, key, param=param)
    return row


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "Invalid request"}
        param = _param(tuple(first.get("loc", ())))
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return OpenAIError(400, message, param=param, code="invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return OpenAIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return OpenAIError(500, f"Internal error: {type(exc).__name__}: {exc}", type="server_error").response()
