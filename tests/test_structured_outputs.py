"""Structured outputs and tool calls (issue 19, part 4) on the vLLM engine, driven like a user does: the official
openai SDK against `vbatch up` serving the tiny chat model, with curation on into the session's Label Studio.

What it proves: a chat batch whose lines ask for a JSON schema (``response_format`` or vLLM's own
``structured_outputs``) completes with every answer an OpenAI ``ChatCompletion`` whose content parses and
validates against its schema, ending by itself (``finish_reason: stop``), and its items are reviewed in the
``json_extraction`` project; a tool-calling batch returns ``tool_calls`` whose arguments validate against the
tool's parameters, for a named function and for ``"required"``, and a line asking for ``"auto"`` (or giving tools
without a ``tool_choice``) is that line's clear error on ``tool_choice`` while the others complete; the same
online, streamed included, and on the Responses API. The tiny model writes junk, so every schema here bounds
what it may write (enums, bounded integers, strings with ``maxLength``, closed objects): only the engine's
settings (compact JSON, vbatch's tool parser; vllm_server.py) make such answers end within ``max_tokens``.
"""

from __future__ import annotations

import json
import time

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from tests.conftest import chat_line, jsonl, running_stack
from tests.test_api import _upload, _wait_batch
from vbatch_pipelines.models.registry import TINY_MODEL_ID

pytestmark = [pytest.mark.stack, pytest.mark.vllm]

WEATHER = {
    "type": "object", "additionalProperties": False, "required": ["colour", "count", "label", "ok", "tags"],
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "label": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 2},
    },
}
SUM = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                      "b": {"type": "integer", "minimum": 0, "maximum": 99}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather.", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": SUM}}]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
PROMPTS = ["What is the weather like?", "Tell me about a cat.", "Describe the ocean.", "What is 3 plus 4?",
           "Hello there.", "Write about a robot.", "The market is busy.", "A violin in the desert."]
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}


@pytest.fixture(scope="module")
def label_studio(label_studio_server):
    from resources import LabelStudio

    _, conn = label_studio_server
    return LabelStudio(url=conn.url, token=conn.token)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_path, label_studio):
    with running_stack(tmp_path_factory.mktemp("structured-home"), tiny_model_path, VBATCH_CURATION="on",
                       VBATCH_LABEL_STUDIO_URL=label_studio.url, VBATCH_LABEL_STUDIO_TOKEN=label_studio.token) as stack:
        yield stack


def _run(client: openai.OpenAI, lines: list[dict], curation: bool = False):
    batch = client.batches.create(input_file_id=_upload(client, jsonl(lines)).id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"curation": "on" if curation else "off"})
    done = _wait_batch(client, batch.id)
    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()] \
        if done.error_file_id else []
    return done, output, errors


def _completions(output: list[dict]) -> dict[str, ChatCompletion]:
    """Each output line's body as the SDK's ChatCompletion, by custom_id: OpenAI's shape."""
    completions = {}
    for line in output:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["response"]["status_code"] == 200
        completions[line["custom_id"]] = ChatCompletion.model_validate(line["response"]["body"])
    return completions


def _valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def test_a_json_schema_batch_every_answer_validates_and_is_reviewed_as_json(stack, label_studio):
    from vbatch_pipelines.curation.schemas import CHAT_REVIEW, JSON_EXTRACTION

    client = stack.client()
    lines = [chat_line(f"schema-{i}", PROMPTS[i % len(PROMPTS)], max_tokens=128, response_format=JSON_SCHEMA,
                       **({"temperature": 1.0, "seed": i} if i % 2 else {})) for i in range(16)]
    lines += [chat_line(f"vllm-{i}", PROMPTS[i], max_tokens=64, structured_outputs={"json": SUM}) for i in range(4)]
    done, output, errors = _run(client, lines, curation=True)
    assert done.status == "completed" and errors == [], (done, errors)
    assert done.request_counts.completed == done.request_counts.total == len(lines)
    completions = _completions(output)
    assert sorted(completions) == sorted(line["custom_id"] for line in lines)
    answers = {}
    for custom_id, completion in completions.items():
        choice = completion.choices[0]
        assert completion.object == "chat.completion" and completion.model == TINY_MODEL_ID
        assert choice.finish_reason == "stop" and choice.message.role == "assistant" and not choice.message.tool_calls
        answers[custom_id] = _valid(choice.message.content, WEATHER if custom_id.startswith("schema") else SUM)
    assert len({json.dumps(a, sort_keys=True) for a in answers.values()}) > 1  # sampled lines differ

    # Curation: every item in the json_extraction project, pre-filled with the JSON answer; none as a chat review.
    json_project, chat_project = label_studio.project_for(JSON_EXTRACTION), label_studio.project_for(CHAT_REVIEW)
    deadline = time.monotonic() + 300
    while len(tasks := label_studio.tasks_of_batch(json_project, done.id)) < len(lines) and time.monotonic() < deadline:
        time.sleep(1)
    assert sorted(tasks) == sorted(completions)
    assert label_studio.tasks_of_batch(chat_project, done.id) == {}
    for custom_id in ("schema-0", "vllm-0"):
        task = label_studio.client.tasks.get(str(tasks[custom_id]))
        assert task.data["schema"] == "json_extraction"
        assert json.loads(task.data["response"]) == answers[custom_id]


def test_a_tool_calling_batch_returns_tool_calls(stack, label_studio):
    from vbatch_pipelines.curation.schemas import CHAT_REVIEW

    client = stack.client()
    named = [chat_line(f"named-{i}", PROMPTS[i], max_tokens=128, tools=TOOLS,
                       tool_choice={"type": "function", "function": {"name": ("get_weather", "add")[i % 2]}})
             for i in range(6)]
    # "required" lets the model make several calls unless parallel_tool_calls is false: the tiny model would
    # make them until max_tokens.
    required = [chat_line(f"required-{i}", PROMPTS[i], max_tokens=128, tools=TOOLS, tool_choice="required",
                          parallel_tool_calls=False) for i in range(4)]
    unforced = [chat_line("auto", PROMPTS[0], tools=TOOLS, tool_choice="auto"),
                chat_line("default", PROMPTS[1], tools=TOOLS),  # tools without tool_choice: "auto"
                chat_line("none", PROMPTS[2], tools=TOOLS, tool_choice="none")]
    done, output, errors = _run(client, named + required + unforced, curation=True)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (13, 11, 2)
    completions = _completions(output)
    for line in named + required:
        choice = completions[line["custom_id"]].choices[0]
        assert choice.message.content in (None, "") and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id
        if line in named:  # OpenAI and vLLM: "stop" for a named function, "tool_calls" for "required"
            assert call.function.name == line["body"]["tool_choice"]["function"]["name"]
            assert choice.finish_reason == "stop"
        else:
            assert choice.finish_reason == "tool_calls"
        _valid(call.function.arguments, PARAMETERS[call.function.name])
    answer = completions["none"].choices[0]
    assert answer.message.content and not answer.message.tool_calls and answer.finish_reason in ("stop", "length")

    # "auto" needs a model that writes its own calls, and vLLM's parser for it: each such line is its own error.
    assert sorted(e["custom_id"] for e in errors) == ["auto", "default"]
    for line in errors:
        assert line["response"]["status_code"] == 400
        error = line["response"]["body"]["error"]
        assert error["param"] == "tool_choice" and '"auto"' in error["message"], error

    # Curation: the text answer is reviewed; tool calls are not text to correct, so they are not imported.
    chat_project, deadline = label_studio.project_for(CHAT_REVIEW), time.monotonic() + 300
    while not (tasks := label_studio.tasks_of_batch(chat_project, done.id)) and time.monotonic() < deadline:
        time.sleep(1)
    assert sorted(tasks) == ["none"]


def test_online_structured_outputs_and_tools(stack):
    """The online routes reach the same engine: the SDK's own helpers (a pydantic model as response_format),
    a named tool call streamed, tools on the Responses API, and "auto" refused on both."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        colour: Literal["red", "green", "blue"]
        count: int = Field(ge=0, le=9)
        label: str = Field(max_length=8)

    client = stack.client()
    messages = [{"role": "user", "content": PROMPTS[0]}]
    parsed = client.chat.completions.parse(model=TINY_MODEL_ID, messages=messages, response_format=Weather,
                                           max_tokens=64, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Weather) and parsed.choices[0].finish_reason == "stop"
    plain = client.chat.completions.create(model=TINY_MODEL_ID, messages=messages, response_format=JSON_SCHEMA,
                                           max_tokens=128, temperature=0)
    _valid(plain.choices[0].message.content, WEATHER)

    add = {"type": "function", "function": {"name": "add"}}
    called = client.chat.completions.create(model=TINY_MODEL_ID, messages=messages, tools=TOOLS, tool_choice=add,
                                            max_tokens=64, temperature=0)
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "add" and _valid(call.function.arguments, SUM)
    chunks = list(client.chat.completions.create(model=TINY_MODEL_ID, messages=messages, tools=TOOLS, tool_choice=add,
                                                 max_tokens=64, temperature=0, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert {d.function.name for d in deltas if d.function.name} == {"add"}
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments

    response = client.responses.create(model=TINY_MODEL_ID, input=PROMPTS[3], max_output_tokens=64, temperature=0,
                                       tools=[{"type": "function", "name": "add", "parameters": SUM}],
                                       tool_choice={"type": "function", "name": "add"})
    assert isinstance(response, Response) and response.output[0].type == "function_call"
    assert response.output[0].name == "add" and _valid(response.output[0].arguments, SUM)

    for create, kwargs in ((client.chat.completions.create, {"messages": messages, "tools": TOOLS}),
                           (client.chat.completions.create, {"messages": messages, "tools": TOOLS, "tool_choice": "auto"}),
                           (client.responses.create, {"input": PROMPTS[3], "tools": [
                               {"type": "function", "name": "add", "parameters": SUM}]})):
        with pytest.raises(openai.BadRequestError) as refused:
            create(model=TINY_MODEL_ID, **kwargs)
        assert refused.value.body["param"] == "tool_choice", refused.value.body


def _run_batch_line(custom_id: str, system: str, url: str = "/v1/chat/completions", **body) -> dict:
    """A line of vLLM's run-batch chat input (its max_tokens 1,000 made 512: the tiny model's context is 1,024)."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello world!"}]
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": TINY_MODEL_ID, "messages": messages, "max_tokens": 512, **body}}


def test_vllm_run_batch_chat_inputs(stack):
    """vLLM's own run-batch chat files (tests/entrypoints/openai/test_run_batch.py: INPUT_BATCH, INVALID_INPUT_BATCH
    and INPUT_TOOL_CALLING_BATCH, adapted to the tiny model) through vbatch: the runnable lines give OpenAI-shaped
    output lines; the lines run-batch answers with an error (a model it does not serve, a bad url, a stream) and
    a line without a custom_id are refused before anything runs, each with its line number."""
    client = stack.client()
    helpful, unhelpful = "You are a helpful assistant.", "You are an unhelpful assistant."
    weather = {"type": "function", "function": {
        "name": "get_current_weather", "description": "Get the current weather in a given location",
        "parameters": {"type": "object", "required": ["location"], "properties": {
            # maxLength added: the tiny model would otherwise write the city's name until max_tokens
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
    tool_line = {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "What is the weather in San Francisco?"}],
        "tools": [weather], "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 512}}
    runnable = [_run_batch_line("request-1", helpful), _run_batch_line("request-2", unhelpful)]

    done, output, errors = _run(client, runnable)
    assert done.status == "completed" and errors == [], done
    for line in output:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert set(line["response"]) == {"status_code", "request_id", "body"} and line["response"]["status_code"] == 200
    assert sorted(_completions(output)) == ["request-1", "request-2"]
    done, output, errors = _run(client, [tool_line])
    call = _completions(output)["request-1"].choices[0].message.tool_calls[0]
    assert call.function.name == "get_current_weather" and _valid(call.function.arguments,
                                                                  weather["function"]["parameters"])

    input_batch = runnable + [_run_batch_line("request-3", unhelpful, model="NonExistModel"),
                              _run_batch_line("request-4", unhelpful, url="/bad_url"),
                              _run_batch_line("request-5", unhelpful, stream="True")]
    refused = _wait_batch(client, client.batches.create(input_file_id=_upload(client, jsonl(input_batch)).id,
                                                        endpoint="/v1/chat/completions", completion_window="24h").id)
    assert refused.status == "failed" and refused.output_file_id is None
    assert [(e.line, e.param) for e in refused.errors.data] == [(3, "body.model"), (4, "url"), (5, "body.stream")], \
        refused.errors.data
    no_id = [{k: v for k, v in runnable[0].items() if k != "custom_id"} | {"invalid_field": "request-1"}, runnable[1]]
    refused = _wait_batch(client, client.batches.create(input_file_id=_upload(client, jsonl(no_id)).id,
                                                        endpoint="/v1/chat/completions", completion_window="24h").id)
    assert refused.status == "failed" and [e.line for e in refused.errors.data] == [1], refused.errors.data


# What a Hermes-style model (Qwen2.5, Hermes) writes when it calls a tool itself. The tiny model cannot: a regex
# (vLLM's structured_outputs) makes it write exactly this, as the model would, so that vLLM's own "hermes"
# parser is what turns the text into tool_calls.
HERMES_CALL = r'<tool_call>\{"name": "add", "arguments": \{"a": 3, "b": 4\}\}</tool_call>'


def test_a_model_with_its_tool_parser_serves_auto_tool_calls(tmp_path_factory, tiny_model_path):
    """VBATCH_TOOL_PARSERS names a model family's parser: that model's managed engine starts with it, "auto" (and
    tools without a tool_choice) is served in a batch and online, a call the model writes is read into
    ``tool_calls``, an answer without one stays text, and forced calls still go through the JSON schema."""
    from vbatch_pipelines.settings import load_settings

    with running_stack(tmp_path_factory.mktemp("tool-parser-home"), tiny_model_path, VBATCH_CURATION="off",
                       VBATCH_TOOL_PARSERS=f"{TINY_MODEL_ID}=hermes") as stack:
        client = stack.client()
        writes_a_call = {"structured_outputs": {"regex": HERMES_CALL}}
        lines = [chat_line("auto-call", PROMPTS[3], max_tokens=128, tools=TOOLS, tool_choice="auto", **writes_a_call),
                 chat_line("default-call", PROMPTS[3], max_tokens=128, tools=TOOLS, **writes_a_call),
                 chat_line("auto-text", PROMPTS[1], max_tokens=32, tools=TOOLS, tool_choice="auto"),
                 chat_line("named", PROMPTS[0], max_tokens=128, tools=TOOLS,
                           tool_choice={"type": "function", "function": {"name": "get_weather"}})]
        done, output, errors = _run(client, lines)
        assert done.status == "completed" and errors == [], (done, errors)
        completions = _completions(output)
        for custom_id in ("auto-call", "default-call"):
            choice = completions[custom_id].choices[0]
            assert choice.finish_reason == "tool_calls" and not choice.message.content, choice
            [call] = choice.message.tool_calls
            assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 3, "b": 4}
        text = completions["auto-text"].choices[0]
        assert text.message.content and not text.message.tool_calls and text.finish_reason in ("stop", "length")
        named = completions["named"].choices[0]
        assert named.message.tool_calls[0].function.name == "get_weather"
        _valid(named.message.tool_calls[0].function.arguments, WEATHER)

        online = client.chat.completions.create(model=TINY_MODEL_ID, messages=[{"role": "user", "content": PROMPTS[3]}],
                                                tools=TOOLS, tool_choice="auto", max_tokens=128, extra_body=writes_a_call)
        assert online.choices[0].finish_reason == "tool_calls"
        assert json.loads(online.choices[0].message.tool_calls[0].function.arguments) == {"a": 3, "b": 4}

        with pytest.MonkeyPatch.context() as mp:  # the engine that answered is the one the setting describes
            for key in ("VBATCH_HOME", "VBATCH_VLLM_PYTHON", "VBATCH_MODELS", "VBATCH_TOOL_PARSERS"):
                mp.setenv(key, stack.env[key])
            from resources.factory import build_resources

            engine = build_resources(load_settings())["inference_engine"]
            model = engine.model_registry.lookup(TINY_MODEL_ID)
            argv = engine.server(model).state()["argv"]
        assert argv[argv.index("--tool-call-parser") + 1] == "hermes" and "--tool-parser-plugin" not in argv
