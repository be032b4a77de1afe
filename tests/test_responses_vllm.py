"""The Responses API (issue 19) on vLLM's own Responses implementation, driven like a user does: the official
openai SDK against `vbatch up` serving the tiny chat model (and the tiny embedding model, to be refused).
Also: vLLM and the transformers fallback give the same greedy answers and usage."""

from __future__ import annotations

import functools
import json

import openai
import pytest
from openai.types.responses import Response

from tests.conftest import on_both_engines, submit_batch
from tests.test_api import _wait_batch
from tests.test_responses import INSTRUCTIONS, QUESTIONS, assert_openai_response, responses_line, responses_lines
from vbatch_pipelines.models.registry import TINY_EMBED_MODEL_ID, TINY_MODEL_ID

pytestmark = [pytest.mark.stack, pytest.mark.vllm]


@pytest.fixture()
def stack(models_stack):
    return models_stack


_submit = functools.partial(submit_batch, endpoint="/v1/responses")


def test_a_responses_batch_on_vllm(stack):
    client = stack.client()
    lines = responses_lines(36) + [responses_line("top-k", QUESTIONS[2], top_k=5, temperature=0.8)]  # vLLM's own
    done = _wait_batch(client, _submit(client, lines).id)
    assert done.status == "completed", done
    assert done.request_counts.total == done.request_counts.completed == len(lines) and done.error_file_id is None
    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in output) == sorted(x["custom_id"] for x in lines)
    responses = {}
    for line in output:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert set(line["response"]) == {"status_code", "request_id", "body"}
        assert line["response"]["status_code"] == 200
        responses[line["custom_id"]] = assert_openai_response(line["response"]["body"], TINY_MODEL_ID)
    assert responses["resp-1"].instructions == INSTRUCTIONS and responses["resp-2"].metadata == {"shape": "messages"}
    assert responses["resp-3"].max_output_tokens == 24
    assert done.usage.input_tokens == sum(r.usage.input_tokens for r in responses.values())
    assert done.usage.output_tokens == sum(r.usage.output_tokens for r in responses.values())

    # Lines refused before anything runs: each with its line and param.
    failed = _wait_batch(client, _submit(client, [
        responses_line("a", "x"), responses_line("b", "y", previous_response_id="resp_1"),
        responses_line("c", "z", model=TINY_EMBED_MODEL_ID)]).id)
    assert failed.status == "failed"
    assert [(e.code, e.line, e.param) for e in failed.errors.data] == [
        ("invalid_request", 2, "body.previous_response_id"), ("mismatched_model", 3, "body.model")]


def test_online_responses_on_vllm(stack):
    client = stack.client()
    response = client.responses.create(model=TINY_MODEL_ID, input=QUESTIONS[1], instructions=INSTRUCTIONS,
                                       max_output_tokens=16, temperature=0)
    assert_openai_response(response.model_dump(), TINY_MODEL_ID)
    chat = client.chat.completions.create(model=TINY_MODEL_ID, max_tokens=16, temperature=0, messages=[
        {"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTIONS[1]}])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens

    events = list(client.responses.create(model=TINY_MODEL_ID, input=QUESTIONS[1], instructions=INSTRUCTIONS,
                                          max_output_tokens=16, temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text

    for kwargs, param in (({"model": TINY_EMBED_MODEL_ID}, "model"), ({"store": True}, "store"),
                          ({"previous_response_id": "resp_1"}, "previous_response_id"),
                          ({"conversation": "conv_1"}, "conversation")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(**{"model": TINY_MODEL_ID, "input": "hi", **kwargs})
        assert refused.value.body["param"] == param, refused.value.body


def test_vllm_and_transformers_answer_alike(stack):
    """Greedy answers to the simple shapes, and their usage, are the same on both engines: the fallback builds
    the prompt as vLLM's Responses implementation does."""
    from vbatch_pipelines.engine.transformers_engine import TransformersEngine

    bodies = [line["body"] for line in responses_lines(8) if line["body"]["temperature"] == 0]
    async def ask(engine):
        return await engine.request_many("/v1/responses", bodies)

    served, computed = on_both_engines(stack, TINY_MODEL_ID, TransformersEngine, ask)
    for a, b in zip(served, computed):
        assert a.ok and b.ok, (a.body, b.body)
        a, b = Response.model_validate(a.body), Response.model_validate(b.body)
        assert a.output_text == b.output_text and a.status == b.status
        assert (a.usage.input_tokens, a.usage.output_tokens) == (b.usage.input_tokens, b.usage.output_tokens)
