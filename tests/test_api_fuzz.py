"""Schemathesis against the app's own OpenAPI schema: whatever a client sends, no 5xx, and every response
conforms to the schema the app documents (status code, content type, body).

In-process (ASGI) on a real metadata DB, the transformers engine serving the tiny model, Dagster
unreachable (batches are recorded for the sensor). ``benchmarks/fuzz_api.py`` runs the same checks with
more examples against a real `vbatch up`. VBATCH_FUZZ_EXAMPLES sets the examples per operation.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]

REQUEST_TIMEOUT_S = 300


def api_schema(**changes):

    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    # Dagster where nothing listens; a small upload limit; schemathesis' ASGI client calls as Host "testserver"
    api = {"max_upload_bytes": 65536, "allowed_hosts": ("testserver",), **changes.pop("api", {})}
    settings = load_settings().replace(dagster={"url": "http://127.0.0.1:9"}, api=api, **changes)
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(settings))


@pytest.mark.parametrize("caller", ["no keys", "use key", "admin key", "wrong key"])
def test_no_server_errors(vbatch_home, caller):
    """Every route, admin routes included, as each kind of caller: without keys configured, with a use key
    (admin routes answer 403), an admin key, a key that is not one (401 everywhere)."""
    keys = {} if caller == "no keys" else {"api": {"keys": ("fuzz-use",), "admin_keys": ("fuzz-admin",)}}
    key = {"use key": "fuzz-use", "admin key": "fuzz-admin", "wrong key": "nope"}.get(caller)
    schema = api_schema(**keys)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    examples = None if caller == "no keys" else 10  # the same routes again: fewer examples each
    fuzz_operations(operations, headers=headers, examples=examples)


def test_aris_routes_no_server_errors(curation_home, aristotle_url, monkeypatch):
    """The Aris extension's routes, on: a real Aristotle database and Label Studio behind them."""

    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    monkeypatch.setenv("VBATCH_ARIS_DATABASE_URL", aristotle_url)
    settings = load_settings().replace(dagster={"url": "http://127.0.0.1:9"}, api={"allowed_hosts": ("testserver",)})
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings))
    operations = [r.ok() for r in schema.get_all_operations()
                  if any(part in r.ok().path for part in ("/sync/", "/icl/", "/aris/"))]
    assert len(operations) == 3, [op.label for op in operations]
    fuzz_operations(operations)


def fuzz_operations(operations, headers: dict | None = None, examples: int | None = None) -> None:
    examples = examples or int(os.environ.get("VBATCH_FUZZ_EXAMPLES", "25"))
    failures = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            # The property is "no 5xx": a large valid request (n=128 over a list of prompts, each up to the
            # context length) rightly takes longer on the CPU engine than schemathesis' 10 s default.
            case.call_and_validate(checks=CHECKS, timeout=REQUEST_TIMEOUT_S, headers=headers or None)

        try:
            fuzz()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report
            details = exc.exceptions if isinstance(exc, ExceptionGroup) else [exc]
            failures.extend(f"{operation.label}: {detail}" for detail in details)
    assert not failures, "\n\n".join(failures)


def undocumented_responses(spec: dict) -> list[str]:
    """Every 2xx response of every operation that has no body schema."""
    missing = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                content = response.get("content") or {}
                if status.startswith("2") and (not content or not all(c.get("schema") for c in content.values())):
                    missing.append(f"{method.upper()} {path} {status}")
    return missing


def test_every_success_response_is_documented(vbatch_home):
    from fastapi import FastAPI

    from api.main import create_app

    spec = create_app().openapi()
    assert len(spec["paths"]) >= 20 and not undocumented_responses(spec)
    untyped = FastAPI()
    untyped.get("/untyped")(lambda: {"anything": 1})
    assert undocumented_responses(untyped.openapi()) == ["GET /untyped 200"], "the check finds an untyped route"
