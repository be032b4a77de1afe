"""Embeddings (issue 19) on vLLM's pooling runner, driven like a user does: the official openai SDK against
`vbatch up` serving the tiny chat and embedding models (the embedding model's own vLLM server starts on first
use). Also: vLLM and the transformers fallback give the same vectors."""

from __future__ import annotations

import functools
import json
import time

import numpy as np
import openai
import pytest

from tests.conftest import chat_line, on_both_engines, submit_batch
from tests.test_api import _wait_batch
from tests.test_embeddings import TEXTS, decode, embed_line
from vbatch_pipelines.models.registry import TINY_EMBED_MODEL_ID, TINY_MODEL_ID, TINY_RERANK_MODEL_ID

pytestmark = [pytest.mark.stack, pytest.mark.vllm]


@pytest.fixture()
def stack(models_stack):
    return models_stack


_submit = functools.partial(submit_batch, endpoint="/v1/embeddings")


def test_an_embeddings_batch_of_1000_inputs(stack, tiny_embed_model_path):
    from transformers import AutoTokenizer

    client = stack.client()
    texts = [f"{TEXTS[i % 4]} Number {i}." for i in range(1000)]
    lines = [embed_line(f"doc-{i}", text) for i, text in enumerate(texts)]
    started = time.monotonic()
    done = _wait_batch(client, _submit(client, lines).id)
    assert done.status == "completed", done
    assert done.request_counts.total == done.request_counts.completed == 1000 and done.request_counts.failed == 0
    assert done.error_file_id is None
    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in output) == sorted(x["custom_id"] for x in lines)
    tokenizer = AutoTokenizer.from_pretrained(tiny_embed_model_path)
    expected = {f"doc-{i}": len(tokenizer(text)["input_ids"]) for i, text in enumerate(texts)}
    for line in output:
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert body["object"] == "list" and body["model"] == TINY_EMBED_MODEL_ID and len(body["data"]) == 1
        vector = body["data"][0]["embedding"]
        assert len(vector) == 64 and abs(np.linalg.norm(vector) - 1) < 1e-4
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == expected[line["custom_id"]]
    assert done.usage.input_tokens == done.usage.total_tokens == sum(expected.values())
    assert done.usage.output_tokens == 0
    print(f"1,000 embedding inputs, create -> completed: {time.monotonic() - started:.1f}s (engine start included)")


def test_vllm_run_batch_embedding_inputs(stack):
    """vLLM's own run-batch embedding lines (tests/entrypoints/openai/test_run_batch.py), on the tiny model."""
    client = stack.client()
    inputs = ["You are a helpful assistant.", "You are an unhelpful assistant.", "Hello world!"]
    lines = [embed_line(f"request-{i + 1}", text) for i, text in enumerate(inputs)]
    done = _wait_batch(client, _submit(client, lines).id)
    assert done.status == "completed" and done.request_counts.completed == 3
    for line in (json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()):
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert set(line["response"]) == {"status_code", "request_id", "body"}
        assert line["response"]["body"]["data"][0]["object"] == "embedding"
    # Its fourth line names a model that does not exist: one batch, one model, so vbatch refuses that line.
    bad = lines + [embed_line("request-4", "Hello world!", model="NonExistModel")]
    failed = _wait_batch(client, _submit(client, bad).id)
    assert failed.status == "failed"
    assert [(e.code, e.line, e.param) for e in failed.errors.data] == [("mismatched_model", 4, "body.model")]


def test_online_embeddings_float_and_base64_agree(stack):
    client = stack.client()
    floats = client.embeddings.create(model=TINY_EMBED_MODEL_ID, input=TEXTS, encoding_format="float")
    raw = client.embeddings.create(model=TINY_EMBED_MODEL_ID, input=TEXTS, encoding_format="base64")
    sdk_default = client.embeddings.create(model=TINY_EMBED_MODEL_ID, input=TEXTS)  # base64, decoded by the SDK
    assert floats.usage.prompt_tokens == raw.usage.prompt_tokens == floats.usage.total_tokens > 0
    for a, b, c in zip(floats.data, raw.data, sdk_default.data):
        assert isinstance(b.embedding, str)
        assert np.allclose(a.embedding, decode(b.embedding), atol=1e-6)
        assert np.allclose(a.embedding, c.embedding, atol=1e-6)
    short = client.embeddings.create(model=TINY_EMBED_MODEL_ID, input=[[5, 6, 7], [8, 9]], dimensions=16,
                                     encoding_format="float")
    assert [len(d.embedding) for d in short.data] == [16, 16] and short.usage.prompt_tokens == 5


def test_wrong_kind_of_model_is_refused(stack):
    client = stack.client()
    for call in (lambda: client.embeddings.create(model=TINY_MODEL_ID, input="hi"),
                 lambda: client.chat.completions.create(model=TINY_EMBED_MODEL_ID,
                                                        messages=[{"role": "user", "content": "hi"}])):
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        assert refused.value.body["param"] == "model" and refused.value.body["code"] == "model_not_supported"
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=TINY_EMBED_MODEL_ID, input="hi", dimensions=100)
    assert refused.value.body["param"] == "dimensions"
    # In batches: the line naming the wrong model, with its number and param.
    failed = _wait_batch(client, _submit(client, [embed_line("a", "x", model=TINY_MODEL_ID)]).id)
    assert [(e.code, e.line, e.param) for e in failed.errors.data] == [("model_not_supported", 1, "body.model")]
    failed = _wait_batch(client, _submit(client, [chat_line("a", "hi"), chat_line("b", "hi", model=TINY_EMBED_MODEL_ID)],
                                         endpoint="/v1/chat/completions").id)
    assert [(e.code, e.line, e.param) for e in failed.errors.data] == [("model_not_supported", 2, "body.model")]
    assert {m.id for m in client.models.list().data} == {TINY_MODEL_ID, TINY_EMBED_MODEL_ID, TINY_RERANK_MODEL_ID}


def test_vllm_and_transformers_give_the_same_vectors(stack):
    from vbatch_pipelines.engine.transformers_embeddings import TransformersEmbeddingEngine

    bodies = [{"model": TINY_EMBED_MODEL_ID, "input": TEXTS},
              {"model": TINY_EMBED_MODEL_ID, "input": [[5, 6, 7, 8, 9], [10, 11]]},
              {"model": TINY_EMBED_MODEL_ID, "input": " ".join(TEXTS * 20), "dimensions": 16}]
    async def ask(engine):
        return await engine.request_many("/v1/embeddings", bodies)

    served, computed = on_both_engines(stack, TINY_EMBED_MODEL_ID, TransformersEmbeddingEngine, ask)
    for a, b in zip(served, computed):
        assert a.ok and b.ok, (a.body, b.body)
        assert a.body["usage"]["prompt_tokens"] == b.body["usage"]["prompt_tokens"]
        for x, y in zip(a.body["data"], b.body["data"]):
            x, y = np.asarray(x["embedding"]), np.asarray(y["embedding"])
            assert x.shape == y.shape
            cosine = float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
            assert cosine >= 0.999, cosine
