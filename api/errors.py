"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the right status.

Domain errors (``vbatch_pipelines.errors.VbatchError`` and its subclasses) carry their status, code and param;
one handler turns any of them into the response, so routes do not translate errors themselves."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vbatch_pipelines.errors import NotFound, VbatchError
from vbatch_pipelines.protocol import error_body
from vbatch_pipelines.store.models import of_project

log = logging.getLogger("vbatch.api")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error"}


class OpenAIError(VbatchError):
    """An error of the API itself (authentication, request shape), with its status first."""

    code = None

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message, param, code, status, type=type)


def error_response(exc: VbatchError) -> JSONResponse:
    kind = exc.type or _TYPES.get(exc.status, "server_error" if exc.status >= 500 else "invalid_request_error")
    return JSONResponse(error_body(exc.message, type=kind, param=exc.param, code=exc.code), status_code=exc.status,
                        headers=getattr(exc, "headers", None))


def not_found(kind: str, identifier: str, param: str | None = None) -> NotFound:
    return NotFound(f"No {kind} found with id '{identifier}'.", param, f"{kind.replace(' ', '_')}_not_found")


def get_or_404(db, model, key: str, kind: str, param: str, project_id: str):
    """The ``model`` row with primary key ``key`` of project ``project_id``, or a 404 in OpenAI's shape naming
    ``kind``: another project's object is answered as one that does not exist, never confirmed by a 403."""
    row = of_project(db.get(model, key), project_id)
    if row is None:
        raise not_found(kind, key, param=param)
    return row


def _param(loc: tuple) -> str | None:
    """A validation error's field, without FastAPI's leading location (a body field may itself be named path)."""
    parts = [str(p) for p in (loc[1:] if loc and loc[0] in ("body", "query", "path", "header", "form") else loc)]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(VbatchError)
    async def _domain(_: Request, exc: VbatchError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        unknown = [_param(tuple(e["loc"])) for e in exc.errors() if e.get("type") == "extra_forbidden"]
        if unknown:  # named, all of them: a field a client misspelt is never silently dropped
            return error_response(OpenAIError(
                400, f"Unrecognized field{'s' if len(unknown) > 1 else ''} in the request body: {', '.join(unknown)}",
                param=unknown[0], code="unknown_field"))
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "Invalid request"}
        param = _param(tuple(first.get("loc", ())))
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return error_response(OpenAIError(400, message, param=param, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(OpenAIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The details (paths, SQL, a library's internals) go to the server log, never to the client: the
        # client gets an id to quote.
        incident = f"err_{uuid.uuid4().hex[:12]}"
        log.error("%s: unexpected error in %s %s", incident, request.method, request.url.path, exc_info=exc)
        return error_response(OpenAIError(500, f"Internal error ({incident}); the server log has the details",
                                          type="server_error", code="internal_error"))
