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

A window stays an Arrow table of (custom_id, body as JSON) while it is planned and sent; the plan itself is a
few numbers per line (its prefix group, its expected length, a digest when it may be a copy). Bodies are parsed
a few thousand at a time, to plan them and again as their requests are sent: as Python objects, 50,000 parsed
chat bodies are ~100 MB, and their JSON texts and tuples were still half a run worker's memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from vbatch_pipelines.batch.runner import ROWS_PER_SLICE, rows_of
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


def plan_window(endpoint: str, window, model: str) -> Iterator[PlannedRequest]:
    """The engine requests for one window of lines (an Arrow table of custom_id, body as JSON), in the order they
    should run; each body's ``model`` becomes ``model``, the engine's name for it."""
    import numpy as np

    size = len(window)
    group = np.empty(size, dtype=np.int64)  # each line's prefix group
    expected = np.empty(size, dtype=np.int64)
    digests = np.zeros(size, dtype="S16")  # a deterministic body's digest (the same line twice is the same text)
    deterministic = np.zeros(size, dtype=bool)
    prefixes: dict[tuple[bytes, ...], int] = {}
    for i, (raw,) in enumerate(rows_of(window, "body")):
        body = json.loads(raw)
        expected[i] = min(expected_tokens(endpoint, body), UNBOUNDED)
        group[i] = prefixes.setdefault(prefix_of(endpoint, body), len(prefixes))
        if is_deterministic(endpoint, body):
            deterministic[i] = True
            digests[i] = _digest(raw, 16)
    # Identical deterministic lines: the first one runs, the others (in file order) are its copies.
    runs = np.ones(size, dtype=bool)
    copies_of: dict[int, list[int]] = {}
    candidates = np.flatnonzero(deterministic)
    if len(candidates):
        _, first, inverse = np.unique(digests[candidates], return_index=True, return_inverse=True)
        original = candidates[first[inverse.reshape(-1)]]
        for line in np.flatnonzero(original != candidates):
            runs[candidates[line]] = False
            copies_of.setdefault(int(original[line]), []).append(int(candidates[line]))
    # Longest first among groups (a group's longest request), then turn by turn; inside a group longest first,
    # equal ones in file order.
    longest = np.zeros(len(prefixes), dtype=np.int64)
    np.maximum.at(longest, group[runs], expected[runs])
    turns = sorted(prefixes.items(), key=lambda item: (-longest[item[1]], item[0]))
    rank = np.empty(len(turns), dtype=np.int64)
    rank[[number for _, number in turns]] = np.arange(len(turns))
    prefixes.clear()
    del turns
    lines = np.flatnonzero(runs)
    order = lines[np.lexsort((lines, -expected[lines], rank[group[lines]]))]
    ids = window.column("custom_id")
    for start in range(0, len(order), ROWS_PER_SLICE):
        taken = order[start:start + ROWS_PER_SLICE]
        for line, (custom_id, raw) in zip(taken.tolist(), rows_of(window.take(taken), "custom_id", "body")):
            body = json.loads(raw)
            body["model"] = model
            copies = ids.take(copies_of.pop(line)).to_pylist() if line in copies_of else []
            yield PlannedRequest(custom_id, body, copies)


def plan_requests(endpoint: str, tables: Iterable, model: str, *, window_requests: int = WINDOW_REQUESTS,
                  window_bytes: int = WINDOW_BYTES) -> Iterator[PlannedRequest]:
    """Every line of ``tables`` (Arrow tables of custom_id, body as JSON, in file order), planned a window at a
    time (see the module's docstring), for ``model``. A window ends at the line that reaches either bound."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    window: list = []
    held_rows = held_bytes = 0
    for table in tables:
        lengths = pc.binary_length(table.column("body")).to_numpy()
        start = 0
        while start < len(table):
            room = min(window_requests - held_rows, len(table) - start)
            reach = np.cumsum(lengths[start:start + room]) + held_bytes
            take = min(room, int(np.searchsorted(reach, window_bytes)) + 1)  # up to the line reaching the bound
            window.append(table.slice(start, take))
            held_rows, held_bytes, start = held_rows + take, int(reach[take - 1]), start + take
            if held_rows >= window_requests or held_bytes >= window_bytes:
                yield from plan_window(endpoint, pa.concat_tables(window), model)
                window, held_rows, held_bytes = [], 0, 0
    if window:
        yield from plan_window(endpoint, pa.concat_tables(window), model)
