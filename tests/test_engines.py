"""The transformers fallback engine and the code location's import hygiene."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from vbatch_pipelines.engine.transformers_engine import TransformersEngine
from vbatch_pipelines.models.registry import ModelSpec


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    return TransformersEngine(ModelSpec("vbatch-tiny-chat", str(tiny_model_path)))


def _ask(engine, endpoint, body):
    async def run():
        try:
            return await engine.request(endpoint, body)
        finally:
            await engine.aclose()

    return asyncio.run(run())


def test_chat_completion_shape_and_usage(engine):
    response = _ask(engine, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "What is 3 plus 4?"}], "max_tokens": 16,
                     "temperature": 0})
    assert response.ok
    body = response.body
    assert body["object"] == "chat.completion" and body["model"] == "vbatch-tiny-chat"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_concurrent_requests_are_batched_and_deterministic(engine):
    bodies = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"}], "max_tokens": 12,
               "temperature": 0} for i in range(16)]

    async def run():
        try:
            return await asyncio.gather(*(engine.request("/v1/chat/completions", b) for b in bodies))
        finally:
            await engine.aclose()

    together = [r.body["choices"][0]["message"]["content"] for r in asyncio.run(run())]
    alone = [_ask(engine, "/v1/chat/completions", b).body["choices"][0]["message"]["content"] for b in bodies[:4]]
    assert together[:4] == alone


def test_completions_n_stop_and_seed(engine):
    body = {"prompt": "Please describe a cat", "max_tokens": 8, "temperature": 0.9, "n": 3, "seed": 11}
    first = _ask(engine, "/v1/completions", body).body
    again = _ask(engine, "/v1/completions", body).body
    assert len(first["choices"]) == 3 and [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    stopped = _ask(engine, "/v1/completions", {"prompt": "What is 2 plus 2?", "max_tokens": 16,
                                                "temperature": 0, "stop": "plus"}).body
    assert "plus" not in stopped["choices"][0]["text"]


@pytest.mark.parametrize("body, code", [
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "context_length_exceeded"),
    ({"messages": [{"role": "nobody", "content": "hi"}]}, "invalid_request"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "invalid_request"),
])
def test_bad_requests_get_openai_errors(engine, body, code):
    response = _ask(engine, "/v1/chat/completions", body)
    assert response.status_code == 400
    assert response.body["error"]["code"] == code and response.body["error"]["message"]


CHAT = {"messages": [{"role": "user", "content": "What is 3 plus 4?"}], "max_tokens": 24, "temperature": 0}
SCHEMA = {"type": "object", "properties": {"sum": {"type": "integer"}}, "required": ["sum"]}


@pytest.mark.parametrize("endpoint, extra, param", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
     "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}],
                              "tool_choice": "required"}, "tools"),
    ("/v1/chat/completions", {"structured_outputs": {"json": SCHEMA}}, "structured_outputs"),
    ("/v1/chat/completions", {"structured_outputs": {"choice": ["yes", "no"]}}, "structured_outputs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/chat/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"use_beam_search": True}, "use_beam_search"),
    ("/v1/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"logprobs": 0}, "logprobs"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/responses", {"text": {"format": {"type": "json_object"}}}, "text"),
    ("/v1/responses", {"presence_penalty": 0.5}, "presence_penalty"),
])
def test_what_the_fallback_cannot_honour_is_refused_by_name(engine, endpoint, extra, param):
    body = {"/v1/chat/completions": CHAT, "/v1/completions": {"prompt": "What is 3 plus 4?", "max_tokens": 8},
            "/v1/responses": {"input": "What is 3 plus 4?", "max_output_tokens": 16}}[endpoint]
    response = _ask(engine, endpoint, {**body, **extra})
    assert response.status_code == 400, response.body
    error = response.body["error"]
    assert (error["param"], error["code"]) == (param, "unsupported_parameter") and "vLLM" in error["message"]


def test_neutral_values_ask_nothing_and_are_answered(engine):
    neutral = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "logprobs": False,
               "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "parallel_tool_calls": True,
               "skip_special_tokens": True, "metadata": {"k": "v"}, "store": False}
    plain = _ask(engine, "/v1/chat/completions", CHAT).body
    assert _ask(engine, "/v1/chat/completions", {**CHAT, **neutral}).body["choices"] == plain["choices"]
    assert _ask(engine, "/v1/completions", {"prompt": "Tell me", "max_tokens": 4, "echo": False, "best_of": 1,
                                            "logprobs": None}).ok


def _tokens(engine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_vllm_sampling_extensions_are_honoured(engine):
    """ignore_eos, min_tokens, stop_token_ids, top_k, min_p and repetition_penalty act as on vLLM."""
    plain = _ask(engine, "/v1/chat/completions", CHAT).body
    answer = plain["choices"][0]["message"]["content"]
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] < 24

    unended = _ask(engine, "/v1/chat/completions", {**CHAT, "ignore_eos": True}).body
    assert (unended["choices"][0]["finish_reason"], unended["usage"]["completion_tokens"]) == ("length", 24)
    assert unended["choices"][0]["message"]["content"].startswith(answer)
    longer = _ask(engine, "/v1/chat/completions", {**CHAT, "min_tokens": 20}).body
    assert longer["usage"]["completion_tokens"] >= 20 > plain["usage"]["completion_tokens"]

    ids = _tokens(engine, answer)
    assert len(ids) >= 2, answer
    cut = _ask(engine, "/v1/chat/completions", {**CHAT, "stop_token_ids": [ids[1]]}).body["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == engine.tokenizer.decode(ids[:1])

    # top_k=1 and min_p=1 keep only the likeliest token: sampling hot gives the greedy answer every time
    for narrow in ({"top_k": 1}, {"min_p": 1.0}):
        hot = _ask(engine, "/v1/chat/completions", {**CHAT, "temperature": 1.5, "n": 4, **narrow}).body
        assert {c["message"]["content"] for c in hot["choices"]} == {answer}, narrow
    wide = _ask(engine, "/v1/chat/completions", {**CHAT, "temperature": 1.5, "n": 4, "top_k": 0}).body
    assert {c["message"]["content"] for c in wide["choices"]} != {answer}

    def distinct(extra):
        body = _ask(engine, "/v1/completions", {"prompt": "Please describe a cat", "max_tokens": 32,
                                                "temperature": 0, "ignore_eos": True, **extra}).body
        return len(set(_tokens(engine, body["choices"][0]["text"])))

    assert distinct({"repetition_penalty": 1.8}) > distinct({})


@pytest.mark.parametrize("extra, param", [
    ({"top_k": "5"}, "top_k"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_tokens": 25}, "min_tokens"),
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"stop_token_ids": [10 ** 9]}, "stop_token_ids"),
    ({"stop_token_ids": "5"}, "stop_token_ids"),
])
def test_bad_sampling_extensions_are_invalid_requests(engine, extra, param):
    response = _ask(engine, "/v1/chat/completions", {**CHAT, **extra})
    assert response.status_code == 400
    assert (response.body["error"]["param"], response.body["error"]["code"]) == (param, "invalid_request")


def test_code_location_loads_without_heavy_imports():
    code = ("import sys, vbatch_pipelines.definitions as d; d.defs.get_repository_def(); "
            "import json; print(json.dumps([m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_cli_builds_the_tiny_model(tmp_path):
    target = tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "vbatch_pipelines.cli", "models", "create-tiny", str(target),
                    "--train-steps", "0"], check=True, capture_output=True)
    config = json.loads((target / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["head_dim"] == 32
    assert (target / "tokenizer.json").exists() and "<|im_start|>" in (target / "chat_template.jinja").read_text()


def test_cli_builds_the_bench_size_chat_model(tmp_path):
    """The bench size: tens of millions of parameters in the table's shape, its size and id in the recipe."""
    from transformers import AutoModelForCausalLM

    from vbatch_pipelines.models.tiny import MODEL_SIZES

    target = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "vbatch_pipelines.cli", "models", "create-tiny", str(target),
                           "--size", "bench", "--train-steps", "0"], check=True, capture_output=True, text=True)
    assert "Serve it as vbatch-bench-chat" in done.stdout
    shape = MODEL_SIZES["bench"]
    config = json.loads((target / "config.json").read_text())
    assert {key: config[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "head_dim", "max_position_embeddings")} == {
        "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
        "head_dim": 64, "max_position_embeddings": 4096} == {key: getattr(shape, key) for key in config
                                                             if key in shape.__dataclass_fields__}
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(target).parameters())
    assert 20e6 <= parameters <= 50e6, parameters
    recipe = json.loads((target / "vbatch_model.json").read_text())
    assert recipe["size"] == "bench" and recipe["model_id"] == "vbatch-bench-chat" and recipe["train_steps"] == 0


@pytest.mark.parametrize("task_flag", ["--embed", "--rerank"])
def test_cli_refuses_the_bench_size_for_a_model_that_is_not_a_chat_model(tmp_path, task_flag):
    target = tmp_path / "model"
    refused = subprocess.run([sys.executable, "-m", "vbatch_pipelines.cli", "models", "create-tiny", task_flag,
                              "--size", "bench", "--train-steps", "0", str(target)], capture_output=True, text=True)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--size bench is a chat model's size" in refused.stderr and "tiny size only" in refused.stderr
    assert not target.exists()  # refused before anything was built


def test_a_vanishing_temperature_is_greedy(engine):
    body = {"prompt": "Please describe a cat", "max_tokens": 6}
    greedy = _ask(engine, "/v1/completions", {**body, "temperature": 0})
    tiny = _ask(engine, "/v1/completions", {**body, "temperature": 5e-324})
    assert tiny.ok and tiny.body["choices"][0]["text"] == greedy.body["choices"][0]["text"]


def test_greedy_with_n_returns_n_identical_choices(engine):
    response = _ask(engine, "/v1/completions", {"prompt": "Please describe a cat", "max_tokens": 5,
                                                "temperature": 0, "n": 3})
    assert response.ok and len(response.body["choices"]) == 3
    assert len({c["text"] for c in response.body["choices"]}) == 1
    assert [c["index"] for c in response.body["choices"]] == [0, 1, 2]


def test_many_prompts_are_generated_in_bounded_chunks(tiny_model_path):
    """Requests with more sequences than max_batch_size, micro-batched together (texts and token ids):
    every prompt answered, in order, exactly as when asked alone."""
    small = TransformersEngine(ModelSpec("vbatch-tiny-chat", str(tiny_model_path)), max_batch_size=4)
    body = {"max_tokens": 6, "temperature": 0, "n": 2}
    texts = {**body, "prompt": ["Please describe a cat", "What is 2 plus 2?", "Tell me", "What is 9 plus 1?"]}
    token_ids = {**body, "prompt": [[5, 6, 7], [8, 9, 10, 11, 12]]}
    sequences_per_call = []
    generate = small.model.generate

    def counting_generate(**kwargs):
        sequences_per_call.append(len(kwargs["input_ids"]) * kwargs["num_return_sequences"])
        return generate(**kwargs)

    small.model.generate = counting_generate

    async def together():
        try:
            return await asyncio.gather(*(small.request("/v1/completions", b) for b in (texts, token_ids)))
        finally:
            await small.aclose()

    for response, request in zip(asyncio.run(together()), (texts, token_ids)):
        assert [c["index"] for c in response.body["choices"]] == list(range(2 * len(request["prompt"])))
        alone = [_ask(small, "/v1/completions", {**body, "prompt": p}).body for p in request["prompt"]]
        assert [c["text"] for c in response.body["choices"]] == [c["text"] for a in alone for c in a["choices"]]
        assert response.body["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    sampled = _ask(small, "/v1/completions", {**texts, "temperature": 1.0, "n": 3}).body
    assert len(sampled["choices"]) == 12
    assert max(sequences_per_call) <= 4 and sequences_per_call[-4:] == [3, 3, 3, 3]  # n=3: a prompt per call


class FlakyEngine:
    """The real engine behind a fault: a server going down answers 5xx for some requests inside a chunk
    (what vLLM said during a shutdown), then comes back after ``recover``."""

    def __init__(self, engine, failures: int):
        self.engine, self.failures, self.recovered = engine, failures, 0
        self.backend, self.model_id = engine.backend, engine.model_id

    async def request_many(self, endpoint, bodies, share=None):
        from vbatch_pipelines.engine.base import EngineResponse

        responses = await self.engine.request_many(endpoint, bodies)
        if self.failures:
            self.failures -= 1
            return [EngineResponse(500, {"error": {"message": "cannot schedule new futures after shutdown"}})
                    if i % 2 else r for i, r in enumerate(responses)]
        return responses

    async def recover(self):
        self.recovered += 1

    async def aclose(self):
        await self.engine.aclose()


def _run(engine, tmp_path, n: int, **options):
    from vbatch_pipelines.batch.runner import BatchProgress, ResultFiles, run_batch_requests

    rows = [(f"r-{i}", {"messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 4}) for i in range(n)]
    results, progress = ResultFiles(tmp_path), BatchProgress(total=n)

    async def go():
        try:
            return await run_batch_requests(engine, "/v1/chat/completions", iter(rows), results, progress,
                                            concurrency=4, chunk_size=4, **options)
        finally:
            results.close()
            await engine.aclose()

    return asyncio.run(go()), results


def test_engine_5xx_inside_a_chunk_is_retried_never_blamed_on_the_request(engine, tmp_path):
    flaky = FlakyEngine(engine, failures=3)
    finished, results = _run(flaky, tmp_path, 12)
    assert finished and flaky.failures == 0 and flaky.recovered >= 2
    ids = [json.loads(line)["custom_id"] for line in results.output_path.read_text().splitlines()]
    assert sorted(ids) == sorted(f"r-{i}" for i in range(12)) and not results.error_path.exists()


def test_an_engine_that_keeps_failing_fails_the_run_and_writes_no_request_errors(engine, tmp_path):
    from vbatch_pipelines.engine.base import EngineUnavailable

    with pytest.raises(EngineUnavailable, match="failed 2 times in a row"):
        _run(FlakyEngine(engine, failures=100), tmp_path, 4, max_attempts=2)
    assert not (tmp_path / "errors.jsonl").exists(), "the engine's failure is not the requests' error"


SLOW_SERVER = """
import http.server, os, sys, time
flag = sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if os.path.exists(flag) and open(flag).read() == str(os.getpid()):
            time.sleep(4)  # busy: answers, but later than a 2 s probe waits
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_busy_server_is_given_time_not_killed_on_one_slow_probe(tmp_path):
    import httpx

    from vbatch_pipelines.detached import DetachedServer, pid_alive

    script, flag = tmp_path / "slow.py", tmp_path / "busy"
    script.write_text(SLOW_SERVER)
    probes: list[str] = []

    class SlowServer(DetachedServer):
        name = "slow"
        startup_timeout_s = 30.0

        def argv(self, port):
            return [sys.executable, str(script), str(port), str(flag)]

        def probe(self, url, timeout):
            probes.append(url)
            try:
                return httpx.get(url, timeout=timeout).status_code == 200
            except httpx.HTTPError:
                return False

    server = SlowServer(tmp_path / "state", "slow")
    try:
        url = server.ensure()
        pid = server.state()["pid"]
        flag.write_text(str(pid))  # this process is busy from now on
        # The answer it gave moments ago stands for ensure (a busy engine takes tenths of a second per probe,
        # every run paid them): no probe.
        probed = len(probes)
        assert server.ensure() == url and len(probes) == probed
        assert not server.healthy(timeout=2.0), "the 2 s probe times out, as on a busy CPU engine"
        assert server.ensure() == url and server.state()["pid"] == pid and pid_alive(pid), "not restarted"
        server.busy_grace_s = 1.0  # one that does not answer within its grace is judged hung and replaced
        assert server.ensure() and server.state()["pid"] != pid
    finally:
        flag.unlink(missing_ok=True)
        server.stop()
