"""The REST front door with the official openai SDK against real processes: `vbatch up` (uvicorn API,
Dagster webserver and daemon, the warm vLLM engine) on a temporary home."""

from __future__ import annotations

import io
import json
import os
import signal
import time

import httpx
import openai
import pytest

from tests.conftest import chat_line, chat_lines, jsonl

pytestmark = [pytest.mark.stack, pytest.mark.vllm]


@pytest.fixture()
def stack(default_stack):
    return default_stack


def _wait_batch(client: openai.OpenAI, batch_id: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.3)
    raise AssertionError(f"{batch_id} still {batch.status}")


def _upload(client: openai.OpenAI, data: bytes):
    return client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")


def test_the_webserver_warms_the_batch_jobs_launch_up(stack):
    """What `vbatch up` asks before it says it is up (its banner says "not answering yet" otherwise): the batch
    job loaded, its execution plan built, the run launcher made with a warm worker. A query the webserver
    refuses is a warm-up that did not happen, and the first batch would pay it."""
    from vbatch_pipelines.dagster_api import warm_up_runs

    assert warm_up_runs(stack.env["VBATCH_DAGSTER_URL"], timeout=60)


def test_batch_round_trip_with_the_openai_sdk(stack):
    client = stack.client()
    lines = chat_lines(60)
    lines.append(chat_line("too-long", "hi", max_tokens=100000))
    uploaded = _upload(client, jsonl(lines))
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"project": "sdk-test"})
    # A small file is validated by the API itself (its fast path): in_progress when create returns.
    assert batch.status == "in_progress" and batch.in_progress_at and batch.metadata == {"project": "sdk-test"}
    done = _wait_batch(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 61 and done.request_counts.completed == 60
    assert done.request_counts.failed == 1
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.usage.output_tokens > 0
    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    ids = [x["custom_id"] for x in output + errors]
    assert sorted(ids) == sorted(x["custom_id"] for x in lines) and len(ids) == len(set(ids))
    assert errors[0]["custom_id"] == "too-long" and errors[0]["response"]["status_code"] == 400
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_bad_line_fails_the_batch_with_line_numbers(stack):
    client = stack.client()
    data = jsonl(chat_lines(3)) + b"{not json}\n" + jsonl([chat_line("req-0", "duplicate id")])
    batch = client.batches.create(input_file_id=_upload(client, data).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    failed = _wait_batch(client, batch.id)
    assert failed.status == "failed" and failed.failed_at
    found = [(e.code, e.line) for e in failed.errors.data]
    assert ("invalid_json_line", 4) in found and ("duplicate_custom_id", 5) in found


def test_cancel_mid_run_keeps_finished_results(stack):
    client = stack.client()
    batch = client.batches.create(input_file_id=_upload(client, jsonl(chat_lines(6000, max_tokens=32))).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    cancelled = _wait_batch(client, batch.id, timeout=60)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    output = client.files.content(cancelled.output_file_id).text.splitlines()
    assert 0 < len(output) < 6000 and len(output) == cancelled.request_counts.completed
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_list_pagination(stack):
    client = stack.client()
    file_id = _upload(client, jsonl(chat_lines(1))).id
    created = [client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                     completion_window="24h").id for _ in range(3)]
    first = client.batches.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    seen = [b.id for b in client.batches.list(limit=2)]  # iterating a page fetches the next ones
    assert set(created) <= set(seen) and len(seen) == len(set(seen))
    files = client.files.list(purpose="batch")
    assert file_id in [f.id for f in files.data]


def test_models_and_online_chat(stack):
    client = stack.client()
    # the configured base model (fine-tunes that other modules on this stack deploy are listed after it)
    assert [m.id for m in client.models.list().data if not m.id.startswith("ft:")] == ["vbatch-tiny-chat"]
    assert client.models.retrieve("vbatch-tiny-chat").owned_by == "vbatch"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    plain = client.chat.completions.create(model="vbatch-tiny-chat", messages=messages, max_tokens=12,
                                           temperature=0)
    assert plain.choices[0].message.content and plain.usage.completion_tokens <= 12
    chunks = list(client.chat.completions.create(model="vbatch-tiny-chat", messages=messages, max_tokens=12,
                                                 temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    text = client.completions.create(model="vbatch-tiny-chat", prompt="Please describe a cat", max_tokens=5,
                                     temperature=0)
    assert text.choices[0].text is not None and text.usage.completion_tokens <= 5
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=messages)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="vbatch-tiny-chat", messages=[])


def test_auth_on_and_off(stack):
    url, _ = stack.start_api(VBATCH_API_KEYS="key-one,key-two")
    with pytest.raises(openai.AuthenticationError):
        stack.client("wrong", base_url=url).models.list()
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/models").json()["error"]["code"] == "missing_api_key"
    assert stack.client("key-two", base_url=url).models.list().data
    assert httpx.get(url + "/health").status_code == 200  # operations stay open
    assert stack.client("anything").models.list().data  # the default API runs without keys


def test_api_restarted_mid_batch_and_the_batch_still_completes(stack):
    url, process = stack.start_api()
    client = stack.client(base_url=url)
    batch = client.batches.create(input_file_id=_upload(client, jsonl(chat_lines(3000))).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    url, _ = stack.start_api()
    done = _wait_batch(stack.client(base_url=url), batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3000
