"""The real vLLM engine (CPU build): materialization, one warm server across batches, restart after a kill."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tests.conftest import Platform, chat_lines, jsonl, vllm_python
from vbatch_pipelines.models.registry import TINY_MODEL_ID

pytestmark = [pytest.mark.stack, pytest.mark.vllm]


@pytest.fixture(scope="module")
def vllm_platform(tmp_path_factory, tiny_model_path):
    """One VBATCH_HOME for the module, so its tests share (and test) one managed vLLM server."""
    home = tmp_path_factory.mktemp("vllm-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VBATCH_HOME", str(home))
        mp.setenv("VBATCH_MODELS", f"{TINY_MODEL_ID}={tiny_model_path}")
        mp.setenv("VBATCH_ENGINE", "vllm")
        mp.setenv("VBATCH_VLLM_PYTHON", vllm_python())
        mp.delenv("VBATCH_DATABASE_URL", raising=False)
        platform = Platform()
        try:
            yield platform
        finally:
            for server in platform.resources.inference_engine.running_servers():
                server.stop()


def _server(platform):
    return platform.resources.inference_engine.server(platform.registry.lookup(None))


def test_vllm_batch_materializes_and_matches_transformers(vllm_platform):
    lines = chat_lines(40)
    batch = vllm_platform.submit(jsonl(lines))
    result = vllm_platform.materialize(batch.id)
    assert result.success
    record = vllm_platform.batch(batch.id)
    assert record.status == "completed" and record.request_completed == 40
    out, err = vllm_platform.results(batch.id)
    assert not err and sorted(x["custom_id"] for x in out) == sorted(x["custom_id"] for x in lines)
    metadata = result.asset_materializations_for_node("batch_output")[0].metadata
    assert metadata["engine"].value == "vllm"
    assert record.usage["output_tokens"] == sum(x["response"]["body"]["usage"]["completion_tokens"] for x in out)

    # Greedy decoding: vLLM and the transformers fallback give the same text for the same model.
    from vbatch_pipelines.engine.transformers_engine import TransformersEngine

    engine = TransformersEngine(vllm_platform.registry.lookup(None))
    by_id = {x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"] for x in out}

    async def run():
        return [await engine.request("/v1/chat/completions", line["body"]) for line in lines[:8]]

    for line, response in zip(lines[:8], asyncio.run(run())):
        assert response.body["choices"][0]["message"]["content"] == by_id[line["custom_id"]]


def test_server_stays_warm_across_batches(vllm_platform):
    server = _server(vllm_platform)
    server.ensure()
    before = server.state()
    for _ in range(2):
        batch = vllm_platform.submit(jsonl(chat_lines(10)))
        assert vllm_platform.materialize(batch.id).success
        after = server.state()  # no engine start in between: the same process, started when it was
        assert (after["pid"], after["started_at"]) == (before["pid"], before["started_at"])


def test_completions_and_sampling_options_on_vllm(vllm_platform):
    lines = [{"custom_id": "n2", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": "Please describe a cat", "max_tokens": 6, "temperature": 0.8, "n": 2, "seed": 7}},
             {"custom_id": "stop", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": "What is 2 plus 2?", "max_tokens": 16, "temperature": 0, "stop": ["plus"]}}]
    batch = vllm_platform.submit(jsonl(lines), endpoint="/v1/completions")
    assert vllm_platform.materialize(batch.id).success
    out, err = vllm_platform.results(batch.id)
    assert not err
    bodies = {x["custom_id"]: x["response"]["body"] for x in out}
    assert len(bodies["n2"]["choices"]) == 2
    assert "plus" not in bodies["stop"]["choices"][0]["text"]


def test_killed_server_is_restarted_by_the_next_batch(vllm_platform):
    server = _server(vllm_platform)
    server.ensure()
    old_pid = server.state()["pid"]
    os.killpg(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.healthy() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not server.healthy()
    batch = vllm_platform.submit(jsonl(chat_lines(10)))
    assert vllm_platform.materialize(batch.id).success
    assert server.state()["pid"] != old_pid and server.healthy()
    assert vllm_platform.batch(batch.id).request_completed == 10


def test_engine_single_requests_and_errors(vllm_platform):
    """The per-request path (what online chat uses) and its OpenAI-shaped errors."""

    engine = vllm_platform.resources.inference_engine.open(vllm_platform.registry.lookup(None))

    async def run():
        try:
            ok = await engine.request("/v1/chat/completions", {
                "model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "What is 1 plus 1?"}],
                "max_tokens": 8, "temperature": 0})
            too_long = await engine.request("/v1/chat/completions", {
                "model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000})
            many = await engine.request_many("/v1/chat/completions", [
                {"model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                {"model": TINY_MODEL_ID, "messages": "not a list"},
                {"model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}])
            return ok, too_long, many
        finally:
            await engine.aclose()

    ok, too_long, many = asyncio.run(run())
    assert ok.ok and ok.body["object"] == "chat.completion" and ok.body["usage"]["completion_tokens"] <= 8
    assert too_long.status_code == 400 and too_long.body["error"]["message"]
    assert too_long.body["error"]["type"] == "invalid_request_error"
    assert [r.status_code for r in many] == [200, 400, 400]
    assert all(r.body["error"]["message"] for r in many[1:])


def test_another_projects_small_batch_takes_the_next_free_chunk_slot(vllm_platform, tmp_path):
    """Project A's large batch fills the engine's chunk slots and queues more; project B's small batch, arriving
    later, starts its first chunk at once and is given the next slot that frees for its second (never passed
    over by A's queued chunks), and ends while A runs on."""
    import httpx

    from vbatch_pipelines.batch.runner import BatchProgress, ResultFiles, run_batch_requests

    resource = vllm_platform.resources.inference_engine
    engine = resource.open(vllm_platform.registry.lookup(None))
    server = _server(vllm_platform)
    share_url = server.ensure() + "/vbatch/v1/share"  # the running server's own answer (with its key)
    key = server.auth_headers()

    def requests(prefix: str, n: int):
        return iter([(line["custom_id"], {**line["body"], "model": TINY_MODEL_ID})
                     for line in chat_lines(n, prefix=prefix)])

    async def run():
        big, small = BatchProgress(total=3000), BatchProgress(total=100)
        try:
            a = asyncio.create_task(run_batch_requests(  # twice a batch's window: A queues as many as it runs
                engine, "/v1/chat/completions", requests("a", 3000), ResultFiles(tmp_path / "a"), big,
                concurrency=2 * 64 * resource.slots, chunk_size=64, share=("proj_fair_a", 1.0)))
            # Wait until A holds every slot and has more chunks queued. One look can land in the instant a wave of
            # A's chunks ended together and the client has not yet sent the next (CI once saw 7 of 8 slots).
            seen, deadline = [], asyncio.get_running_loop().time() + 120
            while not (big.completed >= 64 and seen and seen[-1]["running"].get("proj_fair_a") == seen[-1]["slots"]
                       and seen[-1]["waiting"].get("proj_fair_a", 0) > 0):
                assert asyncio.get_running_loop().time() < deadline and not a.done(), seen[-3:]
                await asyncio.sleep(0.05)
                seen.append((await asyncio.to_thread(httpx.get, share_url, headers=key)).json())
            assert seen[-1]["slots"] == resource.slots
            assert await run_batch_requests(engine, "/v1/chat/completions", requests("b", 100),
                                            ResultFiles(tmp_path / "b"), small, concurrency=128, chunk_size=64,
                                            share=("proj_fair_b", 1.0))
            a_finished_then = big.finished
            assert await a
            return small, a_finished_then
        finally:
            await engine.aclose()

    small, a_finished_then = asyncio.run(run())
    assert small.completed == 100 and a_finished_then < 3000
    state = httpx.get(share_url, headers=key).json()
    assert state["granted"]["proj_fair_b"] == 2 and state["passed_over"].get("proj_fair_b", 0) == 0
    assert state["passed_over"]["proj_fair_a"] >= 1  # A's queued chunks waited for B's second


def test_a_planned_batch_runs_identical_lines_once_and_answers_them_as_a_run_in_file_order_does(vllm_platform):
    """Whole-file scheduling (batch.schedule) on the real engine: grouped, reordered and de-duplicated, every
    custom_id is answered once, each copy right after the line it copies, with the answer a run in file order
    without de-duplication gives; the copies are counted in the batch's usage and the usage API's records."""
    from sqlalchemy import select

    from vbatch_pipelines.store.models import UsageRecord

    system = {"role": "system", "content": "You are a helpful assistant."}
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"max_tokens": (4, 24, 12)[i % 3], "temperature": 0,
                       "messages": [system] * (i % 2) + [{"role": "user", "content": f"What is {i} plus {i % 5}?"}]}}
             for i in range(48)]
    lines += [{**line, "custom_id": f"again-{line['custom_id']}"} for line in lines[:12]]  # identical bodies
    lines += [{"custom_id": "sampled", "method": "POST", "url": "/v1/chat/completions",
               "body": {**lines[0]["body"], "temperature": 0.9}}]

    def run() -> tuple[list[dict], object]:
        batch = vllm_platform.submit(jsonl(lines))
        assert vllm_platform.materialize(batch.id).success
        out, err = vllm_platform.results(batch.id)
        assert not err
        return out, vllm_platform.batch(batch.id)

    planned, record = run()
    ids = [line["custom_id"] for line in planned]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines) and len(ids) == len(set(ids))
    for k, custom_id in enumerate(ids):
        if custom_id.startswith("again-"):  # its original just before it
            assert ids[k - 1] == custom_id.removeprefix("again-"), ids
    copied = [line for line in planned if line["custom_id"].startswith("again-")]
    assert record.usage["copied"] == {
        "requests": 12, "input_tokens": sum(x["response"]["body"]["usage"]["prompt_tokens"] for x in copied),
        "output_tokens": sum(x["response"]["body"]["usage"]["completion_tokens"] for x in copied)}
    assert record.usage["input_tokens_details"]["cached_tokens"] == record.usage["copied"]["input_tokens"] > 0
    assert record.usage["input_tokens"] == sum(x["response"]["body"]["usage"]["prompt_tokens"] for x in planned)
    with vllm_platform.db.session() as session:
        usage = session.scalars(select(UsageRecord).where(UsageRecord.batch_id == record.id)).one()
        assert usage.input_cached_tokens == record.usage["copied"]["input_tokens"]

    vllm_platform.configure("inference_engine", plan_batches=False)
    try:
        in_file_order, unplanned = run()
    finally:
        vllm_platform.configure("inference_engine", plan_batches=True)
    assert unplanned.usage["copied"]["requests"] == 0
    answer = {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"] for line in in_file_order}
    assert all(answer[line["custom_id"]] == line["response"]["body"]["choices"][0]["message"]["content"]
               for line in planned if line["custom_id"] != "sampled")


def test_the_engine_serves_vbatch_only(vllm_platform, tmp_path):
    """The managed engine takes no request without the key vbatch made at its start, on any route but its probes
    (vLLM's own --api-key would leave /sleep, /collective_rpc, /pooling, /invocations open); loads adapters only
    from vbatch's store; and runs without vLLM's dev mode on CPU (no sleep mode there)."""
    import httpx

    from vbatch_pipelines.engine.vllm_guard import KEY_ENV

    server = _server(vllm_platform)
    url = server.ensure()
    key = server.auth_headers()
    assert key and server.state()["api_key"] in key["Authorization"]
    chat = {"model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat),
                               ("POST", "/invocations", chat), ("POST", "/collective_rpc", {"method": "x"}),
                               ("POST", "/sleep", None), ("POST", "/pooling", {"input": "x"}),
                               ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/"})):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = httpx.request(method, url + path, json=body, headers=headers, timeout=30)
            assert refused.status_code == 401, (method, path, refused.status_code, refused.text)
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    assert "vllm:" in httpx.get(url + "/metrics", timeout=30).text  # Prometheus scrapes it without a key
    assert httpx.post(url + "/v1/chat/completions", json=chat, headers=key, timeout=60).status_code == 200

    # An adapter from anywhere but the store is refused before vLLM reads it, even with the key.
    outside = tmp_path / "adapter"
    outside.mkdir()
    store = vllm_platform.file_store.fine_tunes_dir
    store.mkdir(parents=True, exist_ok=True)
    escape = store / "escape"
    escape.symlink_to(outside)
    for path in (str(outside), str(store / ".." / ".." / "adapter"), str(escape)):
        refused = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path},
                             headers=key, timeout=30)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "adapter_path_refused", path
    inside = httpx.post(url + "/v1/load_lora_adapter", headers=key, timeout=60,
                        json={"lora_name": "missing", "lora_path": str(store / "no-such-adapter")})
    assert inside.status_code not in (401, 403), inside.text  # vLLM's own answer: there is no adapter there

    environ = open(f"/proc/{server.state()['pid']}/environ", "rb").read().split(b"\0")
    assert b"VLLM_SERVER_DEV_MODE=1" not in environ
    assert any(entry.startswith(KEY_ENV.encode() + b"=") for entry in environ)
    assert server.state()["api_key"] not in " ".join(server.state()["argv"])  # never on the command line


LEND_AND_HANG = """
import time
from resources.factory import build_resources
from vbatch_pipelines.settings import load_settings

resources = build_resources(load_settings(), defer_secrets=False)
server = resources.inference_engine.server(resources.model_registry.resolve(None))
server.sleep = lambda: True  # the GPU boundary: vLLM's CPU build has no sleep mode; a GPU engine sleeps here
assert server.lend_to_training()
print("lent", flush=True)
time.sleep(600)
"""


def test_an_engine_lent_to_a_training_run_that_is_killed_is_taken_back(vllm_platform):
    """A fine-tune's run worker borrows the engine (a GPU engine sleeps for it) and is SIGKILLed before it gives it
    back (issue 30): the loan is in the engine's state, so the next one to ask for the engine finds the borrower
    gone and takes it back (woken; on CPU, which cannot sleep, restarted) instead of adopting an engine that
    answers its probes and fails every request. A borrower still running keeps it."""
    import subprocess
    import sys

    server = _server(vllm_platform)
    server.ensure()
    pid = server.state()["pid"]
    worker = subprocess.Popen([sys.executable, "-c", LEND_AND_HANG], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "lent"
        assert server.state()["lent_to"]["pid"] == worker.pid
        server.ensure()  # the borrower runs: the engine stays lent
        assert server.state()["pid"] == pid and server.state()["lent_to"]["pid"] == worker.pid
    finally:
        worker.kill()  # SIGKILL: no `finally` of the run gives the engine back
        worker.wait()
    server.ensure()
    state = server.state()
    assert "lent_to" not in state and state["pid"] != pid  # taken back (restarted: a CPU engine cannot wake)
    engine = vllm_platform.resources.inference_engine.open(vllm_platform.registry.lookup(None))

    async def chat():
        try:
            return await engine.request("/v1/chat/completions", {"model": TINY_MODEL_ID, "max_tokens": 4,
                                                                  "messages": [{"role": "user", "content": "hi"}]})
        finally:
            await engine.aclose()

    assert asyncio.run(chat()).status_code == 200
