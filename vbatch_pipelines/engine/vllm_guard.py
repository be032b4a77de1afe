"""Runs inside each vLLM server vbatch starts (``--middleware``), outermost: only vbatch may use it.

vLLM's own ``--api-key`` guards ``/v1`` and a few other prefixes, not ``/sleep``, ``/collective_rpc``, ``/pooling``,
``/invocations`` or the scaling routes; and a server with runtime LoRA loading loads an adapter from any path it
is given. So every request but the probes (``GET /health``, ``GET /metrics``: Prometheus scrapes it) must carry
the engine's own key, which vbatch makes at each start and keeps in the engine's owner-only state file (and, for
other nodes, the engine registry); and ``/v1/load_lora_adapter`` takes a path only inside vbatch's model store.
Imports nothing of vbatch: it runs in vLLM's environment."""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

KEY_ENV = "VBATCH_ENGINE_KEY"
ADAPTER_ROOTS_ENV = "VBATCH_ENGINE_ADAPTER_ROOTS"  # os.pathsep-separated directories adapters may come from
OPEN = frozenset({("GET", "/health"), ("GET", "/metrics"), ("HEAD", "/health")})
LOAD_ADAPTER = "/v1/load_lora_adapter"


def _refusal(status: int, message: str, code: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": "authentication_error" if status == 401
                                   else "permission_error", "param": None, "code": code}}, status_code=status)


def adapter_path_allowed(path: str, roots: str) -> bool:
    """Whether ``path`` (resolved, links followed) lies inside one of ``roots`` (resolved too)."""
    if not path or "\0" in path:
        return False
    target = Path(path).resolve()
    return any(target.is_relative_to(Path(root).resolve()) for root in roots.split(os.pathsep) if root)


async def require_key(request, call_next):
    key = os.environ.get(KEY_ENV, "")
    if (request.method, request.url.path) in OPEN:
        return await call_next(request)
    given = request.headers.get("authorization", "")
    if not key or not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        return _refusal(401, "This engine serves vbatch only: send its key", "invalid_api_key")
    if request.url.path == LOAD_ADAPTER:
        try:
            path = json.loads(await request.body()).get("lora_path", "")
        except (ValueError, AttributeError):
            path = ""
        if not isinstance(path, str) or not adapter_path_allowed(path, os.environ.get(ADAPTER_ROOTS_ENV, "")):
            return _refusal(403, f"lora_path {path!r} is not inside vbatch's model store", "adapter_path_refused")
    return await call_next(request)
