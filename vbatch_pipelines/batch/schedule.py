"""Whole-file scheduling: the order a batch's requests go to the engine, and which run at all.

A line-by-line runner sends requests in file order. vbatch has the whole validated file before it runs, so it
reads a window of it (OpenAI's largest batch, 50,000 lines, or 32 MB of request bodies: a file within OpenAI's
limits is planned whole) and sends it in an order the engine serves faster:

- **Shared prefixes back to back.** Lines are grouped by everything before their last turn (system prompt,
  few-shot block, tools): a group's requests reach vLLM together, while its prefix cache holds their prefix.
  Groups are ordered turn by turn, so a 3-shot prefix sits beside the 5-shot one that extends it.
- **Longest first.** Within a group, and among groups, requests that may generate the most tokens
  (``max_tokens`` and its siblings; none given: the longest) go first, so long generations do not run alone at
  the end with the engine half empty.
- **Identical requests run once.** Lines whose bodies are identical and deterministic (``temperature`` 0 with
  one choice, or an embeddings, score or rerank request) are answered by one engine request; the others get a
  copy of its response under their own ``custom_id`` (counted as copies in the batch's usage).

The output file lists lines in the order their requests finished, as OpenAI's does (match them by
``custom_id``); a copy follows the line it copies. Every ``custom_id`` appears once.

A window's plan holds each line's JSON text and a few numbers, not its parsed body: a body is parsed again as
its request is sent, so a run worker's memory does not grow with the window (50,000 parsed chat bodies are
~100 MB of Python objects).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from vbatch_pipelines.protocol import ENDPOINT_REQUESTS, POOLING_ENDPOINTS

WINDOW_REQUESTS = 50_000  # OpenAI's largest batch: such a file is planned whole
WINDOW_BYTES = 32 * 2**20  # and a window's bodies stay within this much JSON
UNBOUNDED = 1 << 62  # no bound in the body or the endpoint's own default: up to the model's context


class PlannedRequest(NamedTuple):
    """One engine request of the plan and the ``custom_id``s of the identical lines its response answers too
    (a ``(custom_id, body)`` row with its copies)."""

    custom_id: str
    body: dict[str, Any]
    copies: list[str]


def prefix_of(endpoint: str, body: dict[str, Any]) -> tuple[bytes, ...]:
    """What a request shares with others before its own part, a digest per turn, so that a prefix sorts right
    before the longer ones that extend it: the tools and every message but the last for chat, the instructions,
    tools and every input item but the last for responses, the prompt for completions, nothing for the pooling
    endpoints."""
    if endpoint == "/v1/chat/completions":
        messages = body.get("messages") or []
        parts = [_dumps(body.get("tools")), *map(_dumps, messages[:-1])]
    elif endpoint == "/v1/responses":
        items = body.get("input")
        head = items[:-1] if isinstance(items, list) else []
        parts = [_dumps([body.get("instructions"), body.get("tools")]), *map(_dumps, head)]
    elif endpoint == "/v1/completions":
        prompt = body.get("prompt")
        parts = [prompt if isinstance(prompt, str) else _dumps(prompt)]
    else:
        parts = []
    return tuple(_digest(part, 8) for part in parts)


def expected_tokens(endpoint: str, body: dict[str, Any]) -> int:
    """How many tokens the request may generate, as its body bounds it (the endpoint's default otherwise)."""
    if endpoint in POOLING_ENDPOINTS:
        return 0
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and value > 0:
            return value
    field = ENDPOINT_REQUESTS[endpoint].model_fields.get("max_tokens") if endpoint in ENDPOINT_REQUESTS else None
    return (field.default if field is not None else None) or UNBOUNDED  # completions: OpenAI's 16


def is_deterministic(endpoint: str, body: dict[str, Any]) -> bool:
    """Whether two identical bodies get the same answer: greedy decoding of one choice, or a pooling request
    (one model pass)."""
    if endpoint in POOLING_ENDPOINTS:
        return True
    return body.get("temperature") == 0 and body.get("n") in (None, 1) and not body.get("stream")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _digest(text: str, size: int) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def plan_window(endpoint: str, rows: list[tuple[str, str]], model: str) -> Iterator[PlannedRequest]:
    """The engine requests for one window of lines (custom_id, body as JSON), in the order they should run;
    each body's ``model`` becomes ``model``, the engine's name for it. Planned whole, parsed as they are taken."""
    copies_of: dict[bytes, list[str]] = {}  # a deterministic body's digest -> the copies of the line that runs
    groups: dict[tuple[bytes, ...], list[tuple[int, str, str, list[str]]]] = {}
    for custom_id, raw in rows:
        body = json.loads(raw)
        copies: list[str] = []
        if is_deterministic(endpoint, body):  # the same line twice is the same JSON text twice
            digest = _digest(raw, 16)
            if digest in copies_of:
                copies_of[digest].append(custom_id)
                continue
            copies_of[digest] = copies
        groups.setdefault(prefix_of(endpoint, body), []).append(
            (expected_tokens(endpoint, body), custom_id, raw, copies))
    del copies_of
    # Longest first among groups (a group's longest request), then turn by turn; inside a group longest first.
    # Python's sort is stable: equal requests keep their file order.
    for prefix in sorted(groups, key=lambda p: (-max(member[0] for member in groups[p]), p)):
        members = groups.pop(prefix)
        members.sort(key=lambda member: -member[0])
        for _, custom_id, raw, copies in members:
            body = json.loads(raw)
            body["model"] = model
            yield PlannedRequest(custom_id, body, copies)


def plan_requests(endpoint: str, rows: Iterable[tuple[str, str]], model: str, *,
                  window_requests: int = WINDOW_REQUESTS, window_bytes: int = WINDOW_BYTES
                  ) -> Iterator[PlannedRequest]:
    """Every line of ``rows`` (custom_id, body as JSON), planned a window at a time (see the module's
    docstring), for ``model``."""
    window: list[tuple[str, str]] = []
    held = 0
    for row in rows:
        window.append(row)
        held += len(row[1])
        if len(window) >= window_requests or held >= window_bytes:
            yield from plan_window(endpoint, window, model)
            window, held = [], 0
    if window:
        yield from plan_window(endpoint, window, model)
