"""Whole-file scheduling (batch.schedule): the order requests go to the engine, and identical ones run once.

The real engine's side (answers of copies equal to a run without de-duplication, the output file's order) is in
tests/test_vllm.py; here the plan itself and the runner's bookkeeping of copies, resumed included."""

from __future__ import annotations

import asyncio
import json

import pyarrow as pa

from vbatch_pipelines.batch.runner import BatchProgress, ResultFiles, run_batch_requests
from vbatch_pipelines.batch.schedule import expected_tokens, is_deterministic, plan_requests, plan_window
from vbatch_pipelines.engine.base import EngineResponse

CHAT = "/v1/chat/completions"
SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 20}


def chat(question: str, *, max_tokens: int | None = 16, system: bool = True, shots: int = 0, **extra) -> dict:
    messages = [SYSTEM] if system else []
    for k in range(shots):
        messages += [{"role": "user", "content": f"What is {k} plus 1?"}, {"role": "assistant", "content": f"{k + 1}"}]
    body = {"model": "whatever-the-user-wrote", "messages": messages + [{"role": "user", "content": question}], **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def rows(*bodies: dict):
    """A window of lines as the runner reads them: an Arrow table of custom_id and body as JSON."""
    return pa.table({"custom_id": [f"r{i}" for i in range(len(bodies))], "body": [json.dumps(b) for b in bodies]})


def ids(table) -> list[str]:
    return table.column("custom_id").to_pylist()


def test_lines_sharing_a_prefix_run_back_to_back_and_the_longest_first():
    lines = rows(chat("a", system=False, max_tokens=8), chat("b", max_tokens=8), chat("c", shots=2, max_tokens=8),
                 chat("d", system=False, max_tokens=64), chat("e", max_tokens=8), chat("f", shots=2, max_tokens=8),
                 chat("g", max_tokens=32))
    order = [request.custom_id for request in plan_window(CHAT, lines, "m")]
    # The group holding the longest request first (no system prompt: r3 then r0); then turn by turn, each group
    # longest first, equal ones in file order: the system prompt alone (r6, r1, r4), then 2 shots after it.
    assert order == ["r3", "r0", "r6", "r1", "r4", "r2", "r5"]
    # Each group is contiguous, every line is planned once, and the engine's model name replaces the user's.
    assert sorted(order) == sorted(ids(lines))
    assert {request.body["model"] for request in plan_window(CHAT, lines, "m")} == {"m"}


def test_a_k_shot_prefix_sits_beside_the_longer_prefixes_that_extend_it():
    lines = rows(*(chat(f"q{i}", shots=shots, max_tokens=8) for i, shots in enumerate([3, 1, 2, 3, 1, 2])))
    order = [request.custom_id for request in plan_window(CHAT, lines, "m")]
    assert order == ["r1", "r4", "r2", "r5", "r0", "r3"]  # 1, 2 then 3 shots: each extends the one before


def test_identical_deterministic_lines_run_once_and_the_others_are_their_copies():
    greedy = chat("What is 2 plus 2?", temperature=0)
    sampled = chat("What is 2 plus 2?", temperature=0.7)
    two = chat("What is 2 plus 2?", temperature=0, n=2)
    lines = rows(greedy, sampled, greedy, sampled, two, two, greedy, chat("other", temperature=0))
    planned = plan_window(CHAT, lines, "m")
    by_id = {request.custom_id: request.copies for request in planned}
    assert by_id["r0"] == ["r2", "r6"]  # the first one runs, in file order its copies
    assert by_id["r1"] == [] and by_id["r3"] == []  # sampling: each its own answer
    assert by_id["r4"] == [] and by_id["r5"] == []  # n=2: sampled choices
    assert sorted(list(by_id) + [c for copies in by_id.values() for c in copies]) == sorted(ids(lines))


def test_pooling_requests_are_deterministic_and_unbounded_generations_count_as_the_longest():
    assert is_deterministic("/v1/embeddings", {"input": "x"})
    assert not is_deterministic(CHAT, chat("x"))  # no temperature: OpenAI's default 1 samples
    assert not is_deterministic(CHAT, chat("x", temperature=0, stream=True))
    assert expected_tokens(CHAT, chat("x", max_tokens=None)) > expected_tokens(CHAT, chat("x", max_tokens=4096))
    assert expected_tokens(CHAT, chat("x", max_tokens=5, max_completion_tokens=9)) == 9
    assert expected_tokens("/v1/completions", {"prompt": "x"}) == 16  # the endpoint's own default


def test_a_large_file_is_planned_a_window_at_a_time_and_keeps_every_line():
    lines = rows(*(chat(f"q{i % 4}", max_tokens=8 + i % 3, temperature=0) for i in range(40)))  # 12 bodies
    whole = list(plan_requests(CHAT, [lines], "m"))
    assert len(whole) == 12 and sum(len(request.copies) for request in whole) == 28
    # Windows of 10 lines: a body comes back 12 lines later, in the next window: planned apart, no copies, and
    # each window's lines go before the next window's.
    windows = list(plan_requests(CHAT, [lines], "m", window_requests=10))
    assert len(windows) == 40 and not any(request.copies for request in windows)
    assert [sorted(int(r.custom_id[1:]) // 10 for r in windows[k:k + 10]) for k in range(0, 40, 10)] == \
        [[k] * 10 for k in range(4)]
    by_bytes = list(plan_requests(CHAT, [lines], "m", window_bytes=1))  # every line a window of its own
    assert [request.custom_id for request in by_bytes] == ids(lines)
    # The runner reads a file a row group at a time: windows cut across row groups plan as the whole table does.
    groups = [lines.slice(0, 7), lines.slice(7, 13), lines.slice(20, 20)]
    line_bytes = len(lines.column("body")[0].as_py())
    for bounds in ({}, {"window_requests": 10}, {"window_bytes": 1}, {"window_bytes": line_bytes * 6}):
        assert list(plan_requests(CHAT, groups, "m", **bounds)) == list(plan_requests(CHAT, [lines], "m", **bounds))


class _Echo:
    """An engine answering each chat request with its last message: the runner's bookkeeping, not a model."""

    backend, model_id, where = "echo", "m", "here"

    def __init__(self):
        self.seen: list[str] = []

    async def request_many(self, endpoint, bodies, share=None):
        self.seen += [body["messages"][-1]["content"] for body in bodies]
        return [EngineResponse(200, {"choices": [{"message": {"content": body["messages"][-1]["content"]}}],
                                     "usage": {"prompt_tokens": 3, "completion_tokens": 2}}) for body in bodies]


def test_copies_are_written_after_their_line_counted_as_copies_and_counted_again_on_resume(tmp_path):
    lines = rows(chat("same", temperature=0), chat("other", temperature=0), chat("same", temperature=0),
                 chat("same", temperature=0))
    engine, results, progress = _Echo(), ResultFiles(tmp_path), BatchProgress(total=4)
    assert asyncio.run(run_batch_requests(engine, CHAT, plan_requests(CHAT, [lines], "m"), results, progress))
    results.close()
    assert sorted(engine.seen) == ["other", "same"]  # two engine requests for four lines
    out = [json.loads(line) for line in results.output_path.read_text().splitlines()]
    assert [line["custom_id"] for line in out if line["response"]["body"]["choices"][0]["message"]["content"] ==
            "same"] == ["r0", "r2", "r3"]  # each copy right after the line it copies
    assert len({line["id"] for line in out}) == 4  # its own line and request ids
    assert (progress.completed, progress.copied, progress.copied_prompt_tokens, progress.prompt_tokens) == (4, 2, 6, 12)

    resumed = BatchProgress(total=4)
    assert set(ResultFiles(tmp_path).resume(resumed)) == {"r0", "r1", "r2", "r3"}
    assert (resumed.completed, resumed.copied, resumed.copied_prompt_tokens) == (4, 2, 6)
