"""The Responses API (issue 19) on the transformers engine, in-process: /v1/responses batches and their line
errors, the online route with the official openai SDK (plain and streamed), what the fallback refuses, and
what curation reads from a Response. tests/test_responses_vllm.py runs the same against `vbatch up` on vLLM."""

from __future__ import annotations

import openai
import pytest
from openai.types.responses import Response

from tests.conftest import Platform, api_client, chat_line, jsonl
from vbatch_pipelines.models.registry import TINY_EMBED_MODEL_ID, TINY_MODEL_ID

QUESTIONS = ["Please describe a cat.", "What is 3 plus 4?", "The ocean is vast and blue.", "Repeat the word quiet."]
INSTRUCTIONS = "Answer in one short sentence."


def responses_line(custom_id: str, input, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
            "body": {"model": TINY_MODEL_ID, "input": input, "max_output_tokens": 16, "temperature": 0, **body}}


def responses_lines(n: int) -> list[dict]:
    """``n`` lines of the simple shapes every engine answers: a string, message items (text parts and plain
    strings), instructions, sampling, metadata."""
    lines = []
    for i in range(n):
        question = f"{QUESTIONS[i % 4]} Number {i}."
        shape = i % 4
        if shape == 0:
            lines.append(responses_line(f"resp-{i}", question))
        elif shape == 1:
            lines.append(responses_line(f"resp-{i}", question, instructions=INSTRUCTIONS))
        elif shape == 2:
            lines.append(responses_line(f"resp-{i}", [
                {"role": "user", "content": [{"type": "input_text", "text": "Hello."}]},
                {"role": "assistant", "content": "Hi, how can I help?"},
                {"type": "message", "role": "user", "content": question}], metadata={"shape": "messages"}))
        else:
            lines.append(responses_line(f"resp-{i}", question, temperature=0.7, top_p=0.9, seed=i,
                                        max_output_tokens=24))
    return lines


def assert_openai_response(body: dict, model: str) -> Response:
    """An output line's body is OpenAI's Response object: the SDK's own model reads it, its message holds
    output_text, its usage adds up."""
    response = Response.model_validate(body)
    assert response.object == "response" and response.model == model and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert response.output_text == message.content[0].text
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    return response


@pytest.fixture()
def platform(vbatch_home, tiny_model_path, tiny_embed_model_path, monkeypatch) -> Platform:
    monkeypatch.setenv("VBATCH_MODELS",
                       f"{TINY_MODEL_ID}={tiny_model_path},{TINY_EMBED_MODEL_ID}={tiny_embed_model_path}")
    return Platform()


def _validate(platform: Platform, lines: list[dict], endpoint: str = "/v1/responses"):
    from vbatch_pipelines.batch.service import validate_input

    batch = platform.submit(jsonl(lines), endpoint=endpoint)
    report = validate_input(platform.db, batch, platform.file_store.batch_dir(batch.id),
                            platform.registry.resolver(endpoint, None))
    return report, [(e["code"], e["line"], e["param"]) for e in report.errors]


def test_responses_batch_runs_in_openai_line_format(platform):
    lines = responses_lines(32)
    lines.append({**responses_line("no-model", QUESTIONS[0]), "body": {"input": QUESTIONS[0]}})  # the default model
    lines.append(responses_line("top-k", QUESTIONS[1], top_k=5, temperature=0.8))  # vLLM's extension, honoured
    # What the fallback cannot honour is that line's own error, naming the parameter; the others complete.
    refused = {
        "tools": responses_line("tools", "x", tools=[{"type": "function", "name": "f", "parameters": {}}]),
        "reasoning": responses_line("reasoning", "x", reasoning={"effort": "low"}),
        "text": responses_line("json", "x", text={"format": {"type": "json_schema", "name": "a",
                                                             "schema": {"type": "object"}}}),
        "truncation": responses_line("truncation", "x", truncation="auto"),
        "include": responses_line("logprobs", "x", include=["message.output_text.logprobs"]),
        "presence_penalty": responses_line("penalty", "x", presence_penalty=0.5),
        "input": responses_line("image", [{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/cat.png"}]}]),
    }
    tool_output = responses_line("tool-output", [{"type": "function_call_output", "call_id": "c1", "output": "4"}])
    batch = platform.submit(jsonl(lines + list(refused.values()) + [tool_output]), endpoint="/v1/responses")
    assert platform.materialize(batch.id).success
    record = platform.batch(batch.id)
    assert record.status == "completed" and record.model == TINY_MODEL_ID
    assert record.request_completed == len(lines) and record.request_failed == len(refused) + 1
    out, err = platform.results(batch.id)
    assert sorted(x["custom_id"] for x in out) == sorted(x["custom_id"] for x in lines)  # one line per custom_id
    by_id = {}
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None and line["response"]["status_code"] == 200
        by_id[line["custom_id"]] = assert_openai_response(line["response"]["body"], TINY_MODEL_ID)
    assert by_id["resp-1"].instructions == INSTRUCTIONS and by_id["resp-2"].metadata == {"shape": "messages"}
    assert by_id["resp-3"].temperature == 0.7 and by_id["resp-3"].max_output_tokens == 24
    assert record.usage["input_tokens"] == sum(r.usage.input_tokens for r in by_id.values())
    assert record.usage["output_tokens"] == sum(r.usage.output_tokens for r in by_id.values())
    errors = {x["custom_id"]: x["response"] for x in err}
    for param, line in refused.items():
        response = errors[line["custom_id"]]
        assert response["status_code"] == 400 and response["body"]["error"]["param"] == param, response
        assert response["body"]["error"]["code"] == "unsupported_parameter"
    assert "function_call_output" in errors["tool-output"]["body"]["error"]["message"]
    assert errors["tool-output"]["body"]["error"]["param"] == "input"


def test_bad_responses_lines_are_refused_before_anything_runs(platform):
    report, errors = _validate(platform, [
        responses_line("ok", "hello"),
        chat_line("chat-url", "hi"),  # a chat line in a Responses batch
        responses_line("int-input", 5),
        responses_line("empty", []),
        responses_line("role", [{"role": "robot", "content": "x"}]),
        responses_line("no-text", [{"role": "user", "content": [{"type": "input_text"}]}]),
        responses_line("short", "x", max_output_tokens=4),
        responses_line("unknown", "x", chat_template="{{ evil }}"),
        responses_line("format", "x", text={"format": {"type": "xml"}}),
        responses_line("chain", "x", previous_response_id="resp_123"),
        responses_line("store", "x", store=True),
        responses_line("background", "x", background=True),
        responses_line("conversation", "x", conversation="conv_1"),
        responses_line("stream", "x", stream=True),
        responses_line("metadata", "x", metadata={f"k{i}": "v" for i in range(17)}),
        responses_line("stored-off", "x", store=False),  # fine: nothing is stored anyway
    ])
    assert not report.ok and report.total == 16
    assert errors == [
        ("mismatched_endpoint", 2, "url"),
        ("invalid_request", 3, "body.input"),
        ("invalid_request", 4, "body.input"),
        ("invalid_request", 5, "body.input"),
        ("invalid_request", 6, "body.input"),
        ("invalid_request", 7, "body.max_output_tokens"),
        ("invalid_request", 8, "body"),
        ("invalid_request", 9, "body.text"),
        ("invalid_request", 10, "body.previous_response_id"),
        ("invalid_request", 11, "body.store"),
        ("invalid_request", 12, "body.background"),
        ("invalid_request", 13, "body.conversation"),
        ("invalid_request", 14, "body.stream"),
        ("invalid_request", 15, "body.metadata"),
    ]
    messages = {e["line"]: e["message"] for e in report.errors}
    assert "input[0].role must be one of" in messages[5] and "input[0].content[0].text" in messages[6]
    assert "Unrecognized request argument supplied: chat_template" in messages[8]
    assert "keeps no responses" in messages[10] and "does not store responses" in messages[11]

    # An embedding model named on a Responses line: that line, param body.model.
    report, errors = _validate(platform, [{**responses_line("a", "x"), "body": {"input": "x"}},
                                          responses_line("b", "y", model=TINY_EMBED_MODEL_ID)])
    assert errors == [("model_not_supported", 2, "body.model")]
    assert "cannot serve /v1/responses" in report.errors[0]["message"] and TINY_MODEL_ID in report.errors[0]["message"]
    # A Responses line in a chat batch, and mixed endpoints in one file.
    _, errors = _validate(platform, [chat_line("a", "hi"), responses_line("b", "hi"), chat_line("c", "yo")],
                          endpoint="/v1/chat/completions")
    assert errors == [("mismatched_endpoint", 2, "url")]


@pytest.fixture()
def sdk(platform):
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    with api_client(create_app(load_settings())) as test_client:
        yield openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="unused", http_client=test_client, max_retries=0)


def test_online_responses_with_the_openai_sdk(sdk):
    response = sdk.responses.create(model=TINY_MODEL_ID, input=QUESTIONS[1], instructions=INSTRUCTIONS,
                                    max_output_tokens=16, temperature=0)
    assert_openai_response(response.model_dump(), TINY_MODEL_ID)
    # The instructions are a system message before the input, as vLLM builds them: the same answer as chat's.
    chat = sdk.chat.completions.create(model=TINY_MODEL_ID, max_tokens=16, temperature=0, messages=[
        {"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTIONS[1]}])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    items = sdk.responses.create(model=TINY_MODEL_ID, max_output_tokens=16, temperature=0, input=[
        {"role": "developer", "content": INSTRUCTIONS},
        {"role": "user", "content": [{"type": "input_text", "text": QUESTIONS[1]}]}])
    assert items.output_text and items.model == TINY_MODEL_ID
    defaulted = sdk.post("/responses", body={"input": "hi", "max_output_tokens": 16}, cast_to=dict)  # no model
    assert defaulted["model"] == TINY_MODEL_ID and defaulted["object"] == "response"

    # Streamed: OpenAI's event sequence, and the same text and usage as the plain response.
    events = list(sdk.responses.create(model=TINY_MODEL_ID, input=QUESTIONS[1], instructions=INSTRUCTIONS,
                                       max_output_tokens=16, temperature=0, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed",
                                                                                    "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
    assert events[-1].response.output_text == response.output_text
    assert events[-1].response.usage.total_tokens == response.usage.total_tokens


def test_online_errors_name_the_param(sdk):
    def refused(param, code=None, **kwargs):
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.responses.create(**{"model": TINY_MODEL_ID, "input": "hi", **kwargs})
        error = caught.value.body
        assert caught.value.status_code == 400 and error["param"] == param, error
        if code:
            assert error["code"] == code, error
        return error

    error = refused("model", "model_not_supported", model=TINY_EMBED_MODEL_ID)
    assert TINY_MODEL_ID in error["message"]
    refused("previous_response_id", previous_response_id="resp_1")
    refused("store", store=True)
    refused("max_output_tokens", "context_length_exceeded", max_output_tokens=100_000)
    refused("input", input=[])
    # On the transformers engine: what it cannot honour, by name.
    refused("tools", "unsupported_parameter", tools=[{"type": "function", "name": "f", "parameters": {}}])
    refused("reasoning", "unsupported_parameter", reasoning={"effort": "high"})
    refused("input", "unsupported_parameter", input=[{"type": "item_reference", "id": "msg_1"}])
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="nope", input="hi")


def test_curation_reads_the_output_text(platform):
    """What curation_tasks builds a review task from, for each successful line of a Responses batch: the answer
    is the Response's output text (as the SDK reads it), the prompt its instructions and input as chat messages,
    and a text.format JSON schema picks the json_extraction schema, as response_format does for chat."""
    from vbatch_pipelines.batch.service import INPUT_FILE, iter_requests
    from vbatch_pipelines.curation.schemas import CHAT_REVIEW, JSON_EXTRACTION, chat_messages, schema_for_batch
    from vbatch_pipelines.defs.curation import REVIEWABLE_ENDPOINTS
    from vbatch_pipelines.protocol import response_text

    assert "/v1/responses" in REVIEWABLE_ENDPOINTS
    lines = responses_lines(4)
    batch = platform.submit(jsonl(lines), endpoint="/v1/responses")
    assert platform.materialize(batch.id).success
    out, _ = platform.results(batch.id)
    answers = {x["custom_id"]: response_text(x["response"]["body"]) for x in out}
    assert answers == {x["custom_id"]: Response.model_validate(x["response"]["body"]).output_text for x in out}
    assert all(answers.values())
    bodies = dict(iter_requests(platform.file_store.batch_dir(batch.id) / INPUT_FILE, set(), TINY_MODEL_ID))
    assert chat_messages(bodies["resp-0"]) == [{"role": "user", "content": lines[0]["body"]["input"]}]
    assert chat_messages(bodies["resp-1"]) == [{"role": "system", "content": INSTRUCTIONS},
                                               {"role": "user", "content": lines[1]["body"]["input"]}]
    assert chat_messages(bodies["resp-2"]) == [{"role": "user", "content": "Hello."},
                                               {"role": "assistant", "content": "Hi, how can I help?"},
                                               {"role": "user", "content": lines[2]["body"]["input"][2]["content"]}]
    assert schema_for_batch({}, bodies["resp-0"]) is CHAT_REVIEW
    structured = {**bodies["resp-0"], "text": {"format": {"type": "json_schema", "name": "a", "schema": {}}}}
    assert schema_for_batch({}, structured) is JSON_EXTRACTION
    # A tool call in the conversation is left out of what a reviewer sees, never a failure.
    with_tool = {"input": [{"role": "user", "content": "2+2?"},
                           {"type": "function_call", "call_id": "c", "name": "add", "arguments": "{}"},
                           {"type": "function_call_output", "call_id": "c", "output": "4"}]}
    assert chat_messages(with_tool) == [{"role": "user", "content": "2+2?"}]


def test_responses_route_has_no_server_errors(platform):
    """Schemathesis on /v1/responses (test_api_fuzz.py covers every route; this one with more examples)."""
    from tests.test_api_fuzz import api_schema, fuzz_operations

    operations = [r.ok() for r in api_schema().get_all_operations() if r.ok().path == "/v1/responses"]
    assert len(operations) == 1
    fuzz_operations(operations, examples=100)


def test_a_responses_batch_in_label_studio(curation_home, tiny_model_path):
    """The expensive path once: a Responses batch's answers become review tasks in the real Label Studio,
    pre-filled with the output text and showing the instructions and input as the dialogue."""
    from tests.test_curation import Curation

    curation = Curation()
    lines = responses_lines(4)
    batch_id = curation.run_batch(lines, endpoint="/v1/responses")
    out, _ = curation.results(batch_id)
    answers = {x["custom_id"]: Response.model_validate(x["response"]["body"]).output_text for x in out}
    tasks = curation.tasks(batch_id)
    assert sorted(tasks) == sorted(answers)
    for custom_id, task_id in tasks.items():
        assert curation.client.tasks.get(str(task_id)).data["response"] == answers[custom_id]
    assert curation.client.tasks.get(str(tasks["resp-1"])).data["messages"] == [
        {"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": lines[1]["body"]["input"]}]
