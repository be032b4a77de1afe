"""Embeddings (issue 19) on the transformers engine, in-process: /v1/embeddings batches and their line errors,
the online route with the official openai SDK, which model serves which endpoint, and what ignores embedding
batches (curation, fine-tuning). tests/test_embeddings_vllm.py runs the same against `vbatch up` on vLLM."""

from __future__ import annotations

import base64
import json
import shutil
import struct

import numpy as np
import openai
import pytest

from tests.conftest import Platform, api_client, chat_line, jsonl
from vbatch_pipelines.models.registry import TINY_EMBED_MODEL_ID, TINY_MODEL_ID

TEXTS = ["Please describe a cat.", "What is 3 plus 4?", "The ocean is vast and blue.", "Repeat the word quiet."]


def embed_line(custom_id: str, input, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": TINY_EMBED_MODEL_ID, "input": input, **body}}


def decode(embedding: str) -> list[float]:
    raw = base64.b64decode(embedding)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


@pytest.fixture()
def platform(embed_home) -> Platform:
    return Platform()


def _validate(platform: Platform, lines: list[dict] | bytes, endpoint: str = "/v1/embeddings"):
    from vbatch_pipelines.batch.service import validate_input

    batch = platform.submit(lines if isinstance(lines, bytes) else jsonl(lines), endpoint=endpoint)
    report = validate_input(platform.db, batch, platform.file_store.batch_dir(batch.id),
                            platform.registry.resolver(endpoint, None))
    return report, [(e["code"], e["line"], e["param"]) for e in report.errors]


def test_models_know_what_they_serve(platform, tiny_model_path, tiny_embed_model_path, monkeypatch):
    from vbatch_pipelines.models.registry import ModelTaskMismatch, detect_task

    assert detect_task(str(tiny_embed_model_path)) == "embed" and detect_task(str(tiny_model_path)) == "generate"
    registry = platform.registry
    assert registry.for_endpoint(None, "/v1/embeddings").id == TINY_EMBED_MODEL_ID  # the embeddings default
    assert registry.for_endpoint(None, "/v1/chat/completions").id == TINY_MODEL_ID
    with pytest.raises(ModelTaskMismatch) as refused:
        registry.for_endpoint(TINY_MODEL_ID, "/v1/embeddings")
    assert refused.value.param == "model" and TINY_EMBED_MODEL_ID in refused.value.message
    # A decoder declared an embedding model in VBATCH_MODELS (":embed"), whatever its files say.
    monkeypatch.setenv("VBATCH_MODELS", f"{TINY_MODEL_ID}={tiny_model_path},as-embed={tiny_model_path}:embed")
    declared = Platform().registry
    assert declared.lookup("as-embed").task == "embed" and declared.lookup("as-embed").path == str(tiny_model_path)
    # With no model configured both tiny models are served (each built when first used).
    monkeypatch.delenv("VBATCH_MODELS")
    registry = Platform().registry
    served = registry.served_models()
    assert [(m.id, m.task) for m in served.values()] == [(TINY_MODEL_ID, "generate"), (TINY_EMBED_MODEL_ID, "embed")]
    built = registry.resolve(registry.for_endpoint(None, "/v1/embeddings").id)  # built on first use
    assert detect_task(built.path) == "embed" and not (registry.file_store.tiny_model_path / "config.json").exists()


def test_embeddings_batch_runs_in_openai_line_format(platform, tiny_embed_model_path):
    from transformers import AutoTokenizer

    from resources import LabelStudio
    from vbatch_pipelines.defs.curation import _curation_tasks

    lines = [embed_line(f"text-{i}", TEXTS[i % 4]) for i in range(12)]
    lines += [embed_line("list", TEXTS), embed_line("tokens", [5, 6, 7, 8]), embed_line("token-lists", [[5, 6], [7]]),
              embed_line("base64", TEXTS[0], encoding_format="base64"), embed_line("short", TEXTS[0], dimensions=16),
              {**embed_line("no-model", TEXTS[1]), "body": {"input": TEXTS[1]}}]
    batch = platform.submit(jsonl(lines), endpoint="/v1/embeddings")
    assert platform.materialize(batch.id).success
    record = platform.batch(batch.id)
    assert record.status == "completed" and record.model == TINY_EMBED_MODEL_ID and record.request_completed == len(lines)
    out, err = platform.results(batch.id)
    assert not err and sorted(x["custom_id"] for x in out) == sorted(x["custom_id"] for x in lines)
    by_id = {x["custom_id"]: x for x in out}
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "list" and body["model"] == TINY_EMBED_MODEL_ID
        assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
        assert all(d["object"] == "embedding" for d in body["data"])
    vector = lambda cid, i=0: by_id[cid]["response"]["body"]["data"][i]["embedding"]  # noqa: E731
    assert len(vector("text-0")) == 64 and abs(np.linalg.norm(vector("text-0")) - 1) < 1e-5  # mean-pooled, normalised
    assert np.allclose(vector("text-0"), vector("list", 0), atol=1e-5)  # an input alone or in a list: one vector
    assert np.allclose(decode(vector("base64")), vector("text-0"), atol=1e-6)
    assert len(vector("short")) == 16 and abs(np.linalg.norm(vector("short")) - 1) < 1e-5
    assert len(by_id["token-lists"]["response"]["body"]["data"]) == 2
    # Usage is the inputs' tokens, as the tokenizer counts them; the batch sums it.
    tokenizer = AutoTokenizer.from_pretrained(tiny_embed_model_path)
    assert by_id["list"]["response"]["body"]["usage"] == {
        "prompt_tokens": sum(len(tokenizer(t)["input_ids"]) for t in TEXTS),
        "total_tokens": sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)}
    assert by_id["tokens"]["response"]["body"]["usage"]["prompt_tokens"] == 4
    assert record.usage["input_tokens"] == sum(x["response"]["body"]["usage"]["prompt_tokens"] for x in out)
    assert record.usage["output_tokens"] == 0
    # Nothing to review: curation skips embedding batches before it looks for Label Studio.
    skipped = _curation_tasks(None, platform.resources.metadata_db, platform.file_store,
                              LabelStudio(url="http://127.0.0.1:9", enabled=True), batch.id)
    assert skipped["tasks"] == 0 and "nothing to review" in skipped["skipped"]


def test_bad_embedding_lines_are_refused_before_anything_runs(platform):
    report, errors = _validate(platform, [
        embed_line("ok", "hello"),
        {**embed_line("chat-url", "x"), "url": "/v1/chat/completions"},
        embed_line("empty", ""),
        embed_line("format", "x", encoding_format="bytes"),
        embed_line("extension", "x", normalize=True),
        embed_line("empty-tokens", [[]]),
        embed_line("mixed", ["a", 1]),
        embed_line("too-many", ["a"] * 2049),
        embed_line("dims-zero", "x", dimensions=0),
        embed_line("stream", "x", stream=True),
    ])
    assert not report.ok and report.total == 10
    assert errors == [
        ("mismatched_endpoint", 2, "url"),
        ("invalid_request", 3, "body.input"),
        ("invalid_request", 4, "body.encoding_format"),
        ("invalid_request", 5, "body"),
        ("invalid_request", 6, "body.input"),
        ("invalid_request", 7, "body.input"),
        ("invalid_request", 8, "body.input"),
        ("invalid_request", 9, "body.dimensions"),
        ("invalid_request", 10, "body"),
    ]
    assert "Unrecognized request argument supplied: normalize" in report.errors[3]["message"]
    assert "2048 inputs" in report.errors[6]["message"]

    # A model that cannot serve the endpoint, named on a line: that line, param body.model.
    _, errors = _validate(platform, [embed_line("a", "x"), embed_line("b", "y")][:1]
                          + [{**embed_line("b", "y"), "body": {"model": TINY_MODEL_ID, "input": "y"}}])
    assert errors == [("mismatched_model", 2, "body.model")]
    _, errors = _validate(platform, [{**embed_line("a", "x"), "body": {"input": "x"}},
                                     {**embed_line("b", "y"), "body": {"model": TINY_MODEL_ID, "input": "y"}}])
    assert errors == [("model_not_supported", 2, "body.model")]
    _, errors = _validate(platform, [chat_line("a", "hi"), chat_line("b", "hi", model=TINY_EMBED_MODEL_ID)],
                          endpoint="/v1/chat/completions")
    assert errors == [("model_not_supported", 2, "body.model")]
    # Mixed endpoints in one file: each line for another endpoint than the batch's.
    _, errors = _validate(platform, [embed_line("a", "x"), chat_line("b", "hi"), embed_line("c", "z")])
    assert errors == [("mismatched_endpoint", 2, "url")]
    # dimensions the model cannot give: reported on the first line asking for each value.
    report, errors = _validate(platform, [embed_line("a", "x", dimensions=16), embed_line("b", "y", dimensions=100),
                                          embed_line("c", "z", dimensions=100)])
    assert errors == [("invalid_value", 2, "body.dimensions")]
    assert "only supports dimensions in range [1, 64], got 100" in report.errors[0]["message"]


def test_dimensions_on_a_model_without_matryoshka(platform, tiny_embed_model_path, tmp_path, monkeypatch):
    plain = tmp_path / "plain-embed"
    shutil.copytree(tiny_embed_model_path, plain)
    config = json.loads((plain / "config.json").read_text())
    del config["is_matryoshka"]
    (plain / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("VBATCH_MODELS", f"plain-embed={plain}")
    report, errors = _validate(Platform(), [embed_line("a", "x", model="plain-embed", dimensions=16)])
    assert errors == [("invalid_value", 1, "body.dimensions")]
    assert "does not support Matryoshka embeddings" in report.errors[0]["message"]


@pytest.fixture()
def sdk(embed_home):
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    with api_client(create_app(load_settings())) as test_client:
        yield openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="unused", http_client=test_client, max_retries=0)


def test_online_embeddings_with_the_openai_sdk(sdk):
    floats = sdk.embeddings.create(model=TINY_EMBED_MODEL_ID, input=TEXTS)
    assert floats.object == "list" and floats.model == TINY_EMBED_MODEL_ID and len(floats.data) == 4
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    # The SDK asks for base64 itself when no format is given, and decodes it: both ways agree.
    default = sdk.embeddings.create(model=TINY_EMBED_MODEL_ID, input=TEXTS)
    explicit = sdk.embeddings.create(model=TINY_EMBED_MODEL_ID, input=TEXTS, encoding_format="base64")
    for a, b, c in zip(floats.data, default.data, explicit.data):
        assert np.allclose(a.embedding, b.embedding, atol=1e-6) and np.allclose(a.embedding, decode(c.embedding), atol=1e-6)
    short = sdk.embeddings.create(model=TINY_EMBED_MODEL_ID, input=TEXTS[0], dimensions=16, encoding_format="float")
    assert len(short.data[0].embedding) == 16
    tokens = sdk.embeddings.create(model=TINY_EMBED_MODEL_ID, input=[[5, 6, 7]], encoding_format="float")
    assert tokens.usage.prompt_tokens == 3
    defaulted = sdk.with_options().post("/embeddings", body={"input": "hi"}, cast_to=dict)  # no model named
    assert defaulted["model"] == TINY_EMBED_MODEL_ID


def test_online_errors_name_the_param(sdk):
    def refused(call, param, code=None):
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        error = caught.value.body
        assert caught.value.status_code == 400 and error["param"] == param, error
        if code:
            assert error["code"] == code, error
        return error

    error = refused(lambda: sdk.embeddings.create(model=TINY_MODEL_ID, input="hi"), "model", "model_not_supported")
    assert TINY_EMBED_MODEL_ID in error["message"]  # it names what can serve the endpoint
    refused(lambda: sdk.chat.completions.create(model=TINY_EMBED_MODEL_ID,
                                                messages=[{"role": "user", "content": "hi"}]), "model",
            "model_not_supported")
    refused(lambda: sdk.completions.create(model=TINY_EMBED_MODEL_ID, prompt="hi"), "model", "model_not_supported")
    refused(lambda: sdk.embeddings.create(model=TINY_EMBED_MODEL_ID, input=""), "input")
    refused(lambda: sdk.embeddings.create(model=TINY_EMBED_MODEL_ID, input="x", dimensions=100), "dimensions")
    refused(lambda: sdk.embeddings.create(model=TINY_EMBED_MODEL_ID, input=[[5, 10**6]]), "input")
    with pytest.raises(openai.NotFoundError):
        sdk.embeddings.create(model="nope", input="hi")
    models = [m.id for m in sdk.models.list().data]
    assert models == [TINY_MODEL_ID, TINY_EMBED_MODEL_ID]


def test_an_embedding_model_is_not_fine_tuned(platform):
    from vbatch_pipelines.fine_tuning import FineTuningError
    from vbatch_pipelines.fine_tuning.service import create_job

    with pytest.raises(FineTuningError) as refused:
        create_job(platform.db, platform.registry, platform.file_store, platform.resources.trainer,
                   model=TINY_EMBED_MODEL_ID, training_file="v1")
    assert refused.value.param == "model" and "embedding model" in refused.value.message


def test_tiny_embedding_model_from_the_cli(tmp_path, tiny_embed_model_path):
    import subprocess
    import sys

    from vbatch_pipelines.engine.transformers_embeddings import pooling_of

    result = subprocess.run([sys.executable, "-m", "vbatch_pipelines.cli", "models", "create-tiny", "--embed",
                             "--train-steps", "0", str(tmp_path / "e")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Tiny embedding model" in result.stdout
    assert json.loads((tmp_path / "e" / "config.json").read_text())["architectures"] == ["LlamaModel"]
    assert pooling_of(tmp_path / "e") == ("MEAN", True) == pooling_of(tiny_embed_model_path)


def test_embeddings_route_has_no_server_errors(embed_home):
    """Schemathesis on /v1/embeddings with an embedding model served (test_api_fuzz.py covers every route with
    the chat model only, where embeddings requests stop at the model check)."""
    from tests.test_api_fuzz import api_schema, fuzz_operations

    operations = [r.ok() for r in api_schema().get_all_operations() if r.ok().path == "/v1/embeddings"]
    assert len(operations) == 1
    fuzz_operations(operations, examples=100)
