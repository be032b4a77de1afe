"""Domain errors: one hierarchy for everything a caller can be told about.

Each error carries what the REST API answers with — an HTTP status, an OpenAI-style ``code``, the
``message`` and the ``param`` at fault — so the API has one handler (``api/errors.py``) instead of a
translation per route, and the CLI prints the same message. Subclasses set defaults for their domain.
"""

from __future__ import annotations


class VbatchError(Exception):
    status: int = 400
    code: str = "invalid_request"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int | None = None, *, type: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.type = type  # OpenAI's error type; None: derived from the status

    def __str__(self) -> str:
        return self.message


class NotFound(VbatchError):
    status = 404
    code = "not_found"


class Unavailable(VbatchError):
    """A system vbatch depends on did not answer; nothing was changed, the caller may retry."""

    status = 503
    code = "unavailable"
