"""Score and rerank (issue 19, part 3): /v1/score and /v1/rerank batches and online routes on the tiny embedding
model (its score is the cosine of two texts' embeddings, as vLLM's bi-encoder scoring) and on the tiny
cross-encoder (a one-label LlamaForSequenceClassification: each pair's logit through a sigmoid, as vLLM's
cross-encoder scoring), the line errors, the chat model refused, the cross-encoder refused for anything else.
First in-process on the transformers fallback; then (marked vllm) against `vbatch up` on vLLM's pooling runner,
with vLLM's own run-batch score and rerank inputs, and the two engines compared."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import (
    Platform,
    api_client,
    chat_line,
    jsonl,
    on_both_engines,
    platform_of,
    submit_batch,
)
from tests.test_api import _wait_batch
from tests.test_embeddings import _validate
from vbatch_pipelines.models.registry import TINY_EMBED_MODEL_ID, TINY_MODEL_ID, TINY_RERANK_MODEL_ID
from vbatch_pipelines.protocol import RerankResponse, ScoreResponse

# The query and documents of vLLM's run-batch score and rerank tests (tests/entrypoints/openai/test_run_batch.py).
QUERY = "What is the capital of France?"
DOCUMENTS = ["The capital of Brazil is Brasilia.", "The capital of France is Paris."]
OTHERS = ["Cats sleep most of the day.", "Paris is a city in France."]


def score_line(custom_id: str, url: str = "/v1/score", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": TINY_EMBED_MODEL_ID, **body}}


def rerank_line(custom_id: str, query, documents, url: str = "/v1/rerank", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": TINY_EMBED_MODEL_ID, "query": query, "documents": documents, **body}}


def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def check_line(line: dict) -> dict:
    """An output line in OpenAI's batch shape, as `vllm run-batch` writes it; its response body."""
    assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None, line
    assert line["id"].startswith("batch_req_") and set(line["response"]) == {"status_code", "request_id", "body"}
    assert line["response"]["status_code"] == 200
    return line["response"]["body"]


def check_rerank(body: dict, documents: list[str], top_n: int = 0, model: str = TINY_EMBED_MODEL_ID) -> None:
    RerankResponse.model_validate(body)
    results = body["results"]
    assert len(results) == (top_n or len(documents)) and body["model"] == model
    assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results), reverse=True)
    assert len({r["index"] for r in results}) == len(results)
    assert all(r["document"] == {"text": documents[r["index"]], "multi_modal": None} for r in results)


@pytest.fixture()
def platform(embed_home) -> Platform:
    return Platform()


def _embed(platform: Platform, texts: list[str]) -> dict[str, list[float]]:
    """Each text's vector from the same platform's /v1/embeddings."""
    engine = platform.resources.inference_engine.open(platform.registry.resolve(TINY_EMBED_MODEL_ID))

    async def run():
        try:
            return await engine.request("/v1/embeddings", {"model": TINY_EMBED_MODEL_ID, "input": texts})
        finally:
            await engine.aclose()

    response = asyncio.run(run())
    assert response.ok, response.body
    return {text: item["embedding"] for text, item in zip(texts, response.body["data"])}


def test_score_and_rerank_batches_in_openai_line_format(platform, tiny_embed_model_path):
    from transformers import AutoTokenizer

    from resources import LabelStudio
    from vbatch_pipelines.batch.runner import ResultFiles
    from vbatch_pipelines.defs.batches import _preview
    from vbatch_pipelines.defs.curation import _curation_tasks

    score_lines = [
        score_line("one-to-many", queries=QUERY, documents=DOCUMENTS),
        score_line("items", queries=QUERY, items=DOCUMENTS),
        score_line("pairs", text_1=[QUERY, OTHERS[0]], text_2=DOCUMENTS),
        score_line("one-to-one", data_1=OTHERS[1], data_2=DOCUMENTS[1]),
        score_line("vllm-path", url="/score", queries=QUERY, documents=DOCUMENTS),  # as run-batch files have it
        {**score_line("no-model"), "body": {"text_1": QUERY, "text_2": OTHERS}},
    ]
    rerank_lines = [
        rerank_line("all", QUERY, DOCUMENTS + OTHERS),
        rerank_line("top-2", QUERY, DOCUMENTS + OTHERS, top_n=2),
        rerank_line("v2", QUERY, DOCUMENTS, url="/v2/rerank"),
        rerank_line("bare", QUERY, DOCUMENTS[1], url="/rerank"),
    ]
    outputs = {}
    for endpoint, lines in (("/v1/score", score_lines), ("/v1/rerank", rerank_lines)):
        batch = platform.submit(jsonl(lines), endpoint=endpoint)
        assert platform.materialize(batch.id).success
        record = platform.batch(batch.id)
        assert record.status == "completed" and record.model == TINY_EMBED_MODEL_ID
        assert record.request_completed == len(lines) and record.request_failed == 0
        out, err = platform.results(batch.id)
        assert not err and sorted(x["custom_id"] for x in out) == sorted(x["custom_id"] for x in lines)
        assert record.usage["input_tokens"] == sum(check_line(x)["usage"]["prompt_tokens"] for x in out)
        assert record.usage["output_tokens"] == 0
        outputs.update({x["custom_id"]: check_line(x) for x in out})
        preview = _preview(ResultFiles(platform.file_store.batch_dir(batch.id)))
        assert ("| scores 0." if endpoint == "/v1/score" else "| ranked #") in preview, preview
        # Nothing to review: curation skips score and rerank batches.
        skipped = _curation_tasks(None, platform.resources.metadata_db, platform.file_store,
                                  LabelStudio(url="http://127.0.0.1:9", enabled=True), batch.id)
        assert skipped["tasks"] == 0 and "nothing to review" in skipped["skipped"]

    vectors = _embed(platform, [QUERY, *DOCUMENTS, *OTHERS])
    scores = {cid: [d["score"] for d in outputs[cid]["data"]] for cid in [x["custom_id"] for x in score_lines]}
    for line in score_lines:
        body = outputs[line["custom_id"]]
        ScoreResponse.model_validate(body)
        assert body["object"] == "list" and body["model"] == TINY_EMBED_MODEL_ID
        assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(len(body["data"]))]
    # Each score is the cosine of the two texts' embeddings: one query against each document, or pair by pair.
    expected = [cosine(vectors[QUERY], vectors[d]) for d in DOCUMENTS]
    assert np.allclose(scores["one-to-many"], expected, atol=1e-5)
    assert np.allclose(scores["items"], scores["one-to-many"], atol=1e-6)
    assert np.allclose(scores["vllm-path"], scores["one-to-many"], atol=1e-6)
    assert np.allclose(scores["pairs"], [expected[0], cosine(vectors[OTHERS[0]], vectors[DOCUMENTS[1]])], atol=1e-5)
    assert np.allclose(scores["one-to-one"], [cosine(vectors[OTHERS[1]], vectors[DOCUMENTS[1]])], atol=1e-5)
    assert np.allclose(scores["no-model"], [cosine(vectors[QUERY], vectors[d]) for d in OTHERS], atol=1e-5)
    # Usage counts every text's tokens once (the query once, however many documents it is scored against).
    tokenizer = AutoTokenizer.from_pretrained(tiny_embed_model_path)
    tokens = {text: len(tokenizer(text)["input_ids"]) for text in vectors}
    assert outputs["one-to-many"]["usage"] == {"prompt_tokens": tokens[QUERY] + tokens[DOCUMENTS[0]] + tokens[DOCUMENTS[1]],
                                               "completion_tokens": 0,
                                               "total_tokens": tokens[QUERY] + sum(tokens[d] for d in DOCUMENTS)}

    # Rerank: the documents best first, with their place in the request and their text; top_n cuts the list.
    check_rerank(outputs["all"], DOCUMENTS + OTHERS)
    check_rerank(outputs["top-2"], DOCUMENTS + OTHERS, top_n=2)
    check_rerank(outputs["v2"], DOCUMENTS)
    check_rerank(outputs["bare"], [DOCUMENTS[1]])
    ranked = {r["index"]: r["relevance_score"] for r in outputs["all"]["results"]}
    assert np.allclose([ranked[i] for i in range(4)],
                       [cosine(vectors[QUERY], vectors[d]) for d in DOCUMENTS + OTHERS], atol=1e-5)
    assert outputs["top-2"]["results"] == outputs["all"]["results"][:2]
    assert outputs["all"]["usage"] == {"prompt_tokens": sum(tokens.values()), "total_tokens": sum(tokens.values())}


def test_bad_score_and_rerank_lines_are_refused_before_anything_runs(platform):
    report, errors = _validate(platform, [
        score_line("ok", queries=QUERY, documents=DOCUMENTS),
        score_line("one-side", queries=QUERY),
        score_line("two-pairs", queries=QUERY, documents=DOCUMENTS, text_1="a", text_2="b"),
        score_line("crossed", text_1=QUERY, documents=DOCUMENTS),
        score_line("lengths", text_1=["a", "b", "c"], text_2=["a", "b"]),
        score_line("empty", queries="", documents=DOCUMENTS),
        score_line("empty-list", queries=QUERY, documents=[]),
        score_line("multimodal", queries={"content": [{"type": "text", "text": "x"}]}, documents=DOCUMENTS),
        score_line("not-text", queries=QUERY, documents=[1, 2]),
        score_line("too-many", queries=QUERY, documents=["d"] * 2049),
        score_line("extension", queries=QUERY, documents=DOCUMENTS, truncate_prompt_tokens=8),
        score_line("top-n", queries=QUERY, documents=DOCUMENTS, top_n=1),
        score_line("stream", queries=QUERY, documents=DOCUMENTS, stream=True),
        rerank_line("rerank-url", QUERY, DOCUMENTS),
        score_line("unknown-url", url="/v3/score", queries=QUERY, documents=DOCUMENTS),
    ], endpoint="/v1/score")
    assert not report.ok and report.total == 15
    assert errors == [
        ("invalid_request", 2, "body"),
        ("invalid_request", 3, "body"),
        ("invalid_request", 4, "body"),
        ("invalid_request", 5, "body.text_2"),
        ("invalid_request", 6, "body.queries"),
        ("invalid_request", 7, "body.documents"),
        ("invalid_request", 8, "body.queries"),
        ("invalid_request", 9, "body.documents"),
        ("invalid_request", 10, "body.documents"),
        ("invalid_request", 11, "body"),
        ("invalid_request", 12, "body"),
        ("invalid_request", 13, "body"),
        ("mismatched_endpoint", 14, "url"),
        ("invalid_url", 15, "url"),
    ]
    messages = [e["message"] for e in report.errors]
    assert "one pair of fields" in messages[0] and "got queries, text_1, documents, text_2" in messages[1]
    assert "1:1, 1:N or N:N; text_1 has 3 texts, text_2 2" in messages[3]
    assert "multimodal inputs" in messages[6] and "at most 2048 texts" in messages[8]
    assert "Unrecognized request argument supplied: truncate_prompt_tokens" in messages[9]
    assert "Unrecognized request argument supplied: top_n" in messages[10]
    assert "/score" in messages[13] and "/v2/rerank" in messages[13]  # the paths a line may use are listed

    report, errors = _validate(platform, [
        rerank_line("ok", QUERY, DOCUMENTS),
        rerank_line("query-list", [QUERY], DOCUMENTS),
        rerank_line("negative-top-n", QUERY, DOCUMENTS, top_n=-1),
        {**rerank_line("no-query", QUERY, DOCUMENTS), "body": {"documents": DOCUMENTS}},
        rerank_line("no-documents", QUERY, None),
        rerank_line("v2", QUERY, DOCUMENTS, url="/v2/rerank"),
        rerank_line("vllm-path", QUERY, DOCUMENTS, url="/rerank"),
        score_line("score-url", url="/score", queries=QUERY, documents=DOCUMENTS),
    ], endpoint="/v1/rerank")
    assert errors == [("invalid_request", 2, "body.query"), ("invalid_request", 3, "body.top_n"),
                      ("invalid_request", 4, "body.query"), ("invalid_request", 5, "body.documents"),
                      ("mismatched_endpoint", 8, "url")]

    # A chat model named on a score or rerank line: that line, param body.model, naming what can serve it.
    report, errors = _validate(platform, [{**score_line("a"), "body": {"queries": QUERY, "documents": DOCUMENTS}},
                                          score_line("b", model=TINY_MODEL_ID, queries=QUERY, documents=DOCUMENTS)],
                               endpoint="/v1/score")
    assert errors == [("model_not_supported", 2, "body.model")]
    assert TINY_MODEL_ID in report.errors[0]["message"] and TINY_EMBED_MODEL_ID in report.errors[0]["message"]
    _, errors = _validate(platform, [rerank_line("a", QUERY, DOCUMENTS, model=TINY_MODEL_ID)], endpoint="/v1/rerank")
    assert errors == [("model_not_supported", 1, "body.model")]
    # Mixed endpoints: an embeddings line in a score batch.
    _, errors = _validate(platform, [score_line("a", queries=QUERY, documents=DOCUMENTS),
                                     {"custom_id": "b", "method": "POST", "url": "/v1/embeddings",
                                      "body": {"input": "x"}}, chat_line("c", "hi")], endpoint="/v1/score")
    assert errors == [("mismatched_endpoint", 2, "url"), ("mismatched_endpoint", 3, "url")]


@pytest.fixture()
def api(embed_home):
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    with api_client(create_app(load_settings())) as client:
        yield client


def test_online_score_and_rerank(api):
    """The online routes (httpx: the openai SDK has none), at /v1/ and at the paths vLLM serves them."""
    body = {"model": TINY_EMBED_MODEL_ID, "queries": QUERY, "documents": DOCUMENTS}
    scored = api.post("/v1/score", json=body)
    assert scored.status_code == 200, scored.text
    ScoreResponse.model_validate(scored.json())
    assert len(scored.json()["data"]) == 2 and scored.json()["usage"]["prompt_tokens"] > 0
    aliased = api.post("/score", json={"text_1": QUERY, "text_2": DOCUMENTS}).json()  # no model: the embedding one
    assert aliased["model"] == TINY_EMBED_MODEL_ID
    assert [d["score"] for d in aliased["data"]] == [d["score"] for d in scored.json()["data"]]
    ranked = [api.post(path, json={"query": QUERY, "documents": DOCUMENTS + OTHERS, "top_n": 3})
              for path in ("/v1/rerank", "/rerank", "/v2/rerank")]
    assert all(r.status_code == 200 for r in ranked), [r.text for r in ranked]
    check_rerank(ranked[0].json(), DOCUMENTS + OTHERS, top_n=3)
    assert ranked[0].json()["results"] == ranked[1].json()["results"] == ranked[2].json()["results"]
    by_index = {r["index"]: r["relevance_score"] for r in ranked[0].json()["results"]}
    assert np.allclose([by_index[0], by_index[1]], [d["score"] for d in scored.json()["data"]], atol=1e-6)
    assert "/score" not in api.get("/openapi.json").json()["paths"]  # vLLM's paths: one handler, documented once

    def refused(path, payload, param, code=None, status=400):
        response = api.post(path, json=payload)
        error = response.json()["error"]
        assert response.status_code == status and error["param"] == param, (response.status_code, error)
        if code:
            assert error["code"] == code, error
        return error

    error = refused("/v1/score", {**body, "model": TINY_MODEL_ID}, "model", "model_not_supported")
    assert TINY_EMBED_MODEL_ID in error["message"]
    refused("/rerank", {"model": TINY_MODEL_ID, "query": QUERY, "documents": DOCUMENTS}, "model",
            "model_not_supported")
    refused("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_2")
    refused("/v1/score", {"queries": QUERY}, None)
    refused("/v2/rerank", {"query": QUERY, "documents": []}, "documents")
    refused("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "max_tokens_per_doc": 4}, None)
    refused("/v1/rerank", {"model": "nope", "query": QUERY, "documents": DOCUMENTS}, "model", "model_not_found", 404)


def test_score_and_rerank_need_a_key_where_embeddings_do(embed_home, monkeypatch):
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    monkeypatch.setenv("VBATCH_API_KEYS", "use-key")
    body = {"query": QUERY, "documents": DOCUMENTS}
    with api_client(create_app(load_settings())) as client:
        for path in ("/v1/embeddings", "/v1/score", "/score", "/v1/rerank", "/rerank", "/v2/rerank"):
            payload = {"input": QUERY} if path == "/v1/embeddings" else \
                {"queries": QUERY, "documents": DOCUMENTS} if "score" in path else body
            assert client.post(path, json=payload).status_code == 401, path
            answered = client.post(path, json=payload, headers={"Authorization": "Bearer use-key"})
            assert answered.status_code == 200, (path, answered.text)


def test_score_and_rerank_routes_have_no_server_errors(embed_home):
    """Schemathesis on the two routes with an embedding model served."""
    from tests.test_api_fuzz import api_schema, fuzz_operations

    operations = [r.ok() for r in api_schema().get_all_operations() if r.ok().path in ("/v1/score", "/v1/rerank")]
    assert len(operations) == 2
    fuzz_operations(operations, examples=60)


# ---- the cross-encoder, on the transformers fallback ---------------------------------------------------------


def rerank_model_line(custom_id: str, url: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": TINY_RERANK_MODEL_ID, **body}}


def pair_scores(path, pairs: list[tuple[str, str]]) -> list[float]:
    """Each pair's score computed here, one pair at a time (no padding): the tokenizer's pair encoding, the
    classifier's one logit, a sigmoid."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.inference_mode():
        return [float(torch.sigmoid(model(**tokenizer(q, d, return_tensors="pt")).logits[0, 0])) for q, d in pairs]


@pytest.fixture()
def rerank_home(embed_home, tiny_model_path, tiny_embed_model_path, tiny_rerank_model_path, monkeypatch):
    """The chat, embedding and cross-encoder tiny models configured (the cross-encoder known from its config)."""
    monkeypatch.setenv("VBATCH_MODELS", f"{TINY_MODEL_ID}={tiny_model_path},{TINY_EMBED_MODEL_ID}="
                       f"{tiny_embed_model_path},{TINY_RERANK_MODEL_ID}={tiny_rerank_model_path}")
    return embed_home


def test_tiny_cross_encoder_is_known_by_its_architecture(tiny_rerank_model_path, tiny_embed_model_path,
                                                        tiny_model_path):
    from transformers import AutoTokenizer

    from vbatch_pipelines.models.registry import detect_task, is_cross_encoder

    config = json.loads((tiny_rerank_model_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["head_dim"] == 32
    assert [detect_task(str(p)) for p in (tiny_rerank_model_path, tiny_embed_model_path, tiny_model_path)] == \
        ["score", "embed", "generate"]
    assert not is_cross_encoder({**config, "id2label": {"0": "no", "1": "yes"}})  # a two-label classifier
    # A pair is the query, a separator, the document, a separator: its last token is the same for every pair.
    tokenizer = AutoTokenizer.from_pretrained(tiny_rerank_model_path)
    sep = tokenizer.bos_token_id
    plain = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (QUERY, DOCUMENTS[1])]
    assert tokenizer(QUERY, DOCUMENTS[1])["input_ids"] == plain[0] + [sep] + plain[1] + [sep]
    assert set(tokenizer(QUERY, DOCUMENTS[1])) == {"input_ids", "attention_mask"}


def test_cross_encoder_batches_on_the_transformers_fallback(rerank_home, tiny_rerank_model_path):
    from transformers import AutoTokenizer

    platform = Platform()
    lines = {"/v1/score": [rerank_model_line("one-to-many", "/v1/score", queries=QUERY, documents=DOCUMENTS + OTHERS),
                           rerank_model_line("pairs", "/score", text_1=[QUERY, OTHERS[0]], text_2=DOCUMENTS)],
             "/v1/rerank": [rerank_model_line("all", "/v1/rerank", query=QUERY, documents=DOCUMENTS + OTHERS),
                            rerank_model_line("top-2", "/v2/rerank", query=QUERY, documents=DOCUMENTS + OTHERS,
                                              top_n=2)]}
    outputs = {}
    for endpoint, batch_lines in lines.items():
        batch = platform.submit(jsonl(batch_lines), endpoint=endpoint)
        assert platform.materialize(batch.id).success
        record = platform.batch(batch.id)
        assert record.status == "completed" and record.model == TINY_RERANK_MODEL_ID
        out, err = platform.results(batch.id)
        assert not err and sorted(x["custom_id"] for x in out) == sorted(x["custom_id"] for x in batch_lines)
        outputs.update({x["custom_id"]: check_line(x) for x in out})
    expected = pair_scores(tiny_rerank_model_path, [(QUERY, d) for d in DOCUMENTS + OTHERS])
    assert max(expected) - min(expected) > 0.05, expected  # scores that tell pairs apart
    scores = outputs["one-to-many"]
    ScoreResponse.model_validate(scores)
    assert scores["model"] == TINY_RERANK_MODEL_ID
    assert np.allclose([d["score"] for d in scores["data"]], expected, atol=1e-5)
    assert np.allclose([d["score"] for d in outputs["pairs"]["data"]],
                       pair_scores(tiny_rerank_model_path, [(QUERY, DOCUMENTS[0]), (OTHERS[0], DOCUMENTS[1])]),
                       atol=1e-5)
    # Usage counts each pair's tokens: the query once per document.
    tokenizer = AutoTokenizer.from_pretrained(tiny_rerank_model_path)
    pair_tokens = sum(len(tokenizer(QUERY, d)["input_ids"]) for d in DOCUMENTS + OTHERS)
    assert scores["usage"]["prompt_tokens"] == pair_tokens == outputs["all"]["usage"]["prompt_tokens"]
    check_rerank(outputs["all"], DOCUMENTS + OTHERS, model=TINY_RERANK_MODEL_ID)
    check_rerank(outputs["top-2"], DOCUMENTS + OTHERS, top_n=2, model=TINY_RERANK_MODEL_ID)
    assert [r["index"] for r in outputs["all"]["results"]] == sorted(range(4), key=lambda i: -expected[i])
    assert outputs["top-2"]["results"] == outputs["all"]["results"][:2]


def test_a_cross_encoder_only_scores(rerank_home):
    """A cross-encoder named on an embeddings or chat line is that line's error before anything runs; a chat
    model asked to score is refused naming both kinds of model that can."""
    platform = Platform()
    report, errors = _validate(platform, [{"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                                           "body": {"model": TINY_RERANK_MODEL_ID, "input": QUERY}}],
                               endpoint="/v1/embeddings")
    assert errors == [("model_not_supported", 1, "body.model")]
    assert "serves score and rerank (a cross-encoder) only" in report.errors[0]["message"]
    assert TINY_EMBED_MODEL_ID in report.errors[0]["message"]  # the model that can
    report, errors = _validate(platform, [chat_line("c", "hi", model=TINY_RERANK_MODEL_ID)],
                               endpoint="/v1/chat/completions")
    assert errors == [("model_not_supported", 1, "body.model")] and TINY_MODEL_ID in report.errors[0]["message"]
    report, errors = _validate(platform, [score_line("s", model=TINY_MODEL_ID, queries=QUERY, documents=DOCUMENTS)],
                               endpoint="/v1/score")
    assert errors == [("model_not_supported", 1, "body.model")]
    assert TINY_EMBED_MODEL_ID in report.errors[0]["message"] and TINY_RERANK_MODEL_ID in report.errors[0]["message"]


def test_online_cross_encoder_routes(rerank_home):
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    with api_client(create_app(load_settings())) as api:
        body = {"model": TINY_RERANK_MODEL_ID, "queries": QUERY, "documents": DOCUMENTS + OTHERS}
        scored = api.post("/v1/score", json=body)
        assert scored.status_code == 200, scored.text
        ScoreResponse.model_validate(scored.json())
        assert scored.json()["model"] == TINY_RERANK_MODEL_ID and len(scored.json()["data"]) == 4
        ranked = api.post("/rerank", json={"model": TINY_RERANK_MODEL_ID, "query": QUERY,
                                           "documents": DOCUMENTS + OTHERS, "top_n": 3})
        assert ranked.status_code == 200, ranked.text
        check_rerank(ranked.json(), DOCUMENTS + OTHERS, top_n=3, model=TINY_RERANK_MODEL_ID)
        by_index = {r["index"]: r["relevance_score"] for r in ranked.json()["results"]}
        assert all(by_index[i] == pytest.approx(scored.json()["data"][i]["score"], abs=1e-6) for i in by_index)
        for path, payload in (("/v1/embeddings", {"input": QUERY}),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            refused = api.post(path, json={"model": TINY_RERANK_MODEL_ID, **payload})
            error = refused.json()["error"]
            assert refused.status_code == 400 and (error["code"], error["param"]) == ("model_not_supported", "model")
            assert "cross-encoder" in error["message"]


def test_tiny_cross_encoder_from_the_cli(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "vbatch_pipelines.cli", "models", "create-tiny", "--rerank",
                             "--train-steps", "0", str(tmp_path / "r")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Tiny cross-encoder model" in result.stdout
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1


# ---- on vLLM, through `vbatch up` ----------------------------------------------------------------------------


@pytest.fixture()
def stack(models_stack):
    return models_stack


def _run(client: openai.OpenAI, lines: list[dict] | str, endpoint: str):
    # The first batch starts the embedding model's vLLM server: minutes on a loaded 2-core machine.
    return _wait_batch(client, submit_batch(client, lines, endpoint).id, timeout=900)


def _output(client: openai.OpenAI, batch) -> dict[str, dict]:
    assert batch.status == "completed" and batch.error_file_id is None, batch
    lines = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    return {line["custom_id"]: check_line(line) for line in lines}


@pytest.mark.stack
@pytest.mark.vllm
def test_score_and_rerank_batches_on_vllm(stack):
    client = stack.client()
    done = _run(client, [score_line("one-to-many", queries=QUERY, documents=DOCUMENTS),
                         score_line("pairs", text_1=[QUERY, OTHERS[0]], text_2=DOCUMENTS),
                         score_line("vllm-path", url="/score", data_1=QUERY, data_2=DOCUMENTS)], "/v1/score")
    assert done.request_counts.total == done.request_counts.completed == 3
    scored = _output(client, done)
    for body in scored.values():
        ScoreResponse.model_validate(body)
        assert body["model"] == TINY_EMBED_MODEL_ID and [d["object"] for d in body["data"]] == ["score", "score"]
    assert scored["one-to-many"]["data"] == scored["vllm-path"]["data"]
    assert scored["pairs"]["data"][0]["score"] == pytest.approx(scored["one-to-many"]["data"][0]["score"], abs=1e-5)
    assert done.usage.input_tokens == sum(body["usage"]["prompt_tokens"] for body in scored.values()) > 0

    done = _run(client, [rerank_line("all", QUERY, DOCUMENTS + OTHERS), rerank_line("top-1", QUERY, DOCUMENTS + OTHERS,
                                                                                    top_n=1, url="/v2/rerank")],
                "/v1/rerank")
    ranked = _output(client, done)
    check_rerank(ranked["all"], DOCUMENTS + OTHERS)
    check_rerank(ranked["top-1"], DOCUMENTS + OTHERS, top_n=1)
    assert ranked["top-1"]["results"] == ranked["all"]["results"][:1]
    by_index = {r["index"]: r["relevance_score"] for r in ranked["all"]["results"]}
    assert [by_index[0], by_index[1]] == pytest.approx([d["score"] for d in scored["one-to-many"]["data"]], abs=1e-5)


@pytest.mark.stack
@pytest.mark.vllm
def test_vllm_run_batch_score_and_rerank_inputs(stack):
    """vLLM's own run-batch score and rerank files (INPUT_SCORE_BATCH, INPUT_RERANK_BATCH), its reranker model
    replaced by the tiny embedding model: every line completes, at whichever of vLLM's paths it names."""
    client = stack.client()
    body = {"model": TINY_EMBED_MODEL_ID, "queries": QUERY, "documents": DOCUMENTS}
    score_file = "\n".join(json.dumps({"custom_id": f"request-{i + 1}", "method": "POST", "url": url, "body": body})
                           for i, url in enumerate(("/score", "/v1/score")))
    scored = _output(client, _run(client, score_file, "/v1/score"))
    assert sorted(scored) == ["request-1", "request-2"] and scored["request-1"]["data"] == scored["request-2"]["data"]

    body = {"model": TINY_EMBED_MODEL_ID, "query": QUERY, "documents": DOCUMENTS}
    rerank_file = [{"custom_id": custom_id, "method": "POST", "url": url, "body": body}
                   for custom_id, url in (("request-1", "/rerank"), ("request-2", "/v1/rerank"),
                                          ("request-2", "/v2/rerank"))]
    # Its third line repeats the second's custom_id: run-batch does not mind, OpenAI's rule (and vbatch's) does.
    failed = _run(client, rerank_file, "/v1/rerank")
    assert failed.status == "failed"
    assert [(e.code, e.line, e.param) for e in failed.errors.data] == [("duplicate_custom_id", 3, "custom_id")]
    rerank_file[2]["custom_id"] = "request-3"
    ranked = _output(client, _run(client, rerank_file, "/v1/rerank"))
    assert sorted(ranked) == ["request-1", "request-2", "request-3"]
    for result in ranked.values():
        check_rerank(result, DOCUMENTS)
        assert result["results"] == ranked["request-1"]["results"]


@pytest.mark.stack
@pytest.mark.vllm
def test_a_chat_model_cannot_score_on_vllm(stack):
    client = stack.client()
    failed = _run(client, [{**score_line("a"), "body": {"queries": QUERY, "documents": DOCUMENTS}},
                           score_line("b", model=TINY_MODEL_ID, queries=QUERY, documents=DOCUMENTS)], "/v1/score")
    assert failed.status == "failed"
    assert [(e.code, e.line, e.param) for e in failed.errors.data] == [("model_not_supported", 2, "body.model")]
    failed = _run(client, [rerank_line("a", QUERY, DOCUMENTS, model=TINY_MODEL_ID)], "/v1/rerank")
    assert [(e.code, e.line, e.param) for e in failed.errors.data] == [("model_not_supported", 1, "body.model")]
    assert TINY_EMBED_MODEL_ID in failed.errors.data[0].message
    refused = httpx.post(f"{stack.api_url}/v1/score", json={"model": TINY_MODEL_ID, "text_1": "a", "text_2": "b"},
                         timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_supported"


@pytest.mark.stack
@pytest.mark.vllm
def test_vllm_and_transformers_give_the_same_scores(stack):
    """The same bodies online (vLLM's /score and /rerank, through vbatch's routes), in a batch chunk (the
    middleware) and on the transformers fallback: the same scores to 1e-3, the same order, the same usage; a
    text longer than the context is a 400 on both."""
    from vbatch_pipelines.engine.transformers_embeddings import TransformersEmbeddingEngine

    long_text = " ".join(DOCUMENTS * 8)
    scores = [{"model": TINY_EMBED_MODEL_ID, "queries": QUERY, "documents": DOCUMENTS + OTHERS},
              {"model": TINY_EMBED_MODEL_ID, "text_1": [QUERY, long_text], "text_2": [long_text, OTHERS[1]]}]
    reranks = [{"model": TINY_EMBED_MODEL_ID, "query": QUERY, "documents": DOCUMENTS + OTHERS + [long_text]},
               {"model": TINY_EMBED_MODEL_ID, "query": OTHERS[1], "documents": DOCUMENTS + OTHERS, "top_n": 2}]
    online = {"/v1/score": [httpx.post(f"{stack.api_url}{path}", json=body, timeout=120)
                            for path, body in zip(("/v1/score", "/score"), scores)],
              "/v1/rerank": [httpx.post(f"{stack.api_url}{path}", json=body, timeout=120)
                             for path, body in zip(("/rerank", "/v2/rerank"), reranks)]}
    async def ask(engine):
        too_long = await engine.request("/v1/rerank", {"model": TINY_EMBED_MODEL_ID, "query": QUERY,
                                                       "documents": [" ".join(DOCUMENTS * 60)]})
        return too_long, {endpoint: await engine.request_many(endpoint, bodies)
                          for endpoint, bodies in (("/v1/score", scores), ("/v1/rerank", reranks))}

    (vllm_refusal, batched), (local_refusal, computed) = on_both_engines(stack, TINY_EMBED_MODEL_ID,
                                                                         TransformersEmbeddingEngine, ask)
    for refusal in (vllm_refusal, local_refusal):
        assert refusal.status_code == 400 and "maximum context length is 1024 tokens" in \
            refusal.body["error"]["message"], refusal.body
    for endpoint in ("/v1/score", "/v1/rerank"):
        for served, chunk, local in zip(online[endpoint], batched[endpoint], computed[endpoint]):
            assert served.status_code == 200 and chunk.ok and local.ok, (served.text, chunk.body, local.body)
            bodies = [served.json(), chunk.body, local.body]
            assert set(bodies[0]) == set(bodies[1]) == set(bodies[2])
            assert len({json.dumps(_ranking(body)) for body in bodies}) == 1, [_ranking(body) for body in bodies]
            assert len({body["usage"]["prompt_tokens"] for body in bodies}) == 1
            for body in bodies[1:]:
                assert np.allclose(_scores(body), _scores(bodies[0]), atol=1e-3)


def _all_engines_up(stack) -> None:
    """The chat, embedding and cross-encoder engines all up at once: each CPU engine's KV cache is sized to its
    model (when each reserved a fifth of the machine, vLLM refused the third on 24 GiB for memory)."""
    with platform_of(stack) as platform:
        engine = platform.resources.inference_engine
        for model_id in (TINY_MODEL_ID, TINY_EMBED_MODEL_ID, TINY_RERANK_MODEL_ID):
            engine.server(platform.registry.lookup(model_id)).ensure()


@pytest.mark.stack
@pytest.mark.vllm
def test_cross_encoder_batches_and_routes_on_vllm_match_the_fallback(stack, tiny_rerank_model_path):
    """The tiny cross-encoder on vLLM's pooling runner (its classify task): score and rerank batches give one
    result per custom_id in vLLM's shapes, the online routes the same scores, and the transformers fallback
    the same scores to 1e-3, the same order and the same usage; a pair longer than the context is a 400 on
    both."""
    from vbatch_pipelines.engine.transformers_embeddings import TransformersCrossEncoderEngine

    _all_engines_up(stack)
    client = stack.client()
    score_lines = [rerank_model_line("one-to-many", "/v1/score", queries=QUERY, documents=DOCUMENTS + OTHERS),
                   rerank_model_line("pairs", "/v1/score", text_1=[QUERY, OTHERS[0]], text_2=DOCUMENTS),
                   rerank_model_line("vllm-path", "/score", data_1=QUERY, data_2=DOCUMENTS + OTHERS)]
    done = _run(client, score_lines, "/v1/score")
    assert done.request_counts.total == done.request_counts.completed == 3
    scored = _output(client, done)
    assert sorted(scored) == sorted(line["custom_id"] for line in score_lines)
    for body in scored.values():
        ScoreResponse.model_validate(body)
        assert body["model"] == TINY_RERANK_MODEL_ID and body["object"] == "list"
    assert scored["one-to-many"]["data"] == scored["vllm-path"]["data"]
    on_vllm = [d["score"] for d in scored["one-to-many"]["data"]]
    assert max(on_vllm) - min(on_vllm) > 0.05 and all(0 < s < 1 for s in on_vllm), on_vllm  # a sigmoid's spread
    assert done.usage.input_tokens == sum(body["usage"]["prompt_tokens"] for body in scored.values()) > 0

    rerank_lines = [rerank_model_line("all", "/v1/rerank", query=QUERY, documents=DOCUMENTS + OTHERS),
                    rerank_model_line("top-1", "/v2/rerank", query=QUERY, documents=DOCUMENTS + OTHERS, top_n=1)]
    ranked = _output(client, _run(client, rerank_lines, "/v1/rerank"))
    assert sorted(ranked) == ["all", "top-1"]
    check_rerank(ranked["all"], DOCUMENTS + OTHERS, model=TINY_RERANK_MODEL_ID)
    check_rerank(ranked["top-1"], DOCUMENTS + OTHERS, top_n=1, model=TINY_RERANK_MODEL_ID)
    assert ranked["top-1"]["results"] == ranked["all"]["results"][:1]
    by_index = {r["index"]: r["relevance_score"] for r in ranked["all"]["results"]}
    assert [by_index[i] for i in range(4)] == pytest.approx(on_vllm, abs=1e-5)

    online = [httpx.post(f"{stack.api_url}/v1/score", json=score_lines[1]["body"], timeout=120),
              httpx.post(f"{stack.api_url}/rerank", json=rerank_lines[0]["body"], timeout=120)]
    assert [r.status_code for r in online] == [200, 200], [r.text for r in online]
    assert online[0].json()["data"] == scored["pairs"]["data"]
    assert online[1].json()["results"] == ranked["all"]["results"]

    long_text = " ".join(DOCUMENTS * 60)

    async def ask(engine):
        too_long = await engine.request("/v1/score", {"model": TINY_RERANK_MODEL_ID, "text_1": QUERY,
                                                      "text_2": long_text})
        return too_long, {endpoint: await engine.request_many(endpoint, [line["body"] for line in lines])
                          for endpoint, lines in (("/v1/score", score_lines), ("/v1/rerank", rerank_lines))}

    (vllm_refusal, batched), (local_refusal, computed) = on_both_engines(stack, TINY_RERANK_MODEL_ID,
                                                                         TransformersCrossEncoderEngine, ask)
    for refusal in (vllm_refusal, local_refusal):
        assert refusal.status_code == 400 and "maximum context length is 1024 tokens" in \
            refusal.body["error"]["message"], refusal.body
    for endpoint, lines in (("/v1/score", score_lines), ("/v1/rerank", rerank_lines)):
        for line, chunk, local in zip(lines, batched[endpoint], computed[endpoint]):
            assert chunk.ok and local.ok, (chunk.body, local.body)
            bodies = [(scored if endpoint == "/v1/score" else ranked)[line["custom_id"]], chunk.body, local.body]
            assert set(bodies[0]) == set(bodies[1]) == set(bodies[2])
            assert len({json.dumps(_ranking(body)) for body in bodies}) == 1, [_ranking(body) for body in bodies]
            assert len({body["usage"]["prompt_tokens"] for body in bodies}) == 1
            for body in bodies[1:]:
                assert np.allclose(_scores(body), _scores(bodies[0]), atol=1e-3), (_scores(body), _scores(bodies[0]))


@pytest.mark.stack
@pytest.mark.vllm
def test_a_cross_encoder_cannot_embed_or_chat_on_vllm(stack):
    client = stack.client()
    failed = _run(client, [{"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                            "body": {"model": TINY_RERANK_MODEL_ID, "input": QUERY}}], "/v1/embeddings")
    assert failed.status == "failed"
    assert [(e.code, e.line, e.param) for e in failed.errors.data] == [("model_not_supported", 1, "body.model")]
    assert "cross-encoder" in failed.errors.data[0].message
    failed = _run(client, [chat_line("c", "hi", model=TINY_RERANK_MODEL_ID)], "/v1/chat/completions")
    assert [(e.code, e.line, e.param) for e in failed.errors.data] == [("model_not_supported", 1, "body.model")]
    refused = httpx.post(f"{stack.api_url}/v1/embeddings", json={"model": TINY_RERANK_MODEL_ID, "input": "a"},
                         timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_supported"


def _scores(body: dict) -> list[float]:
    return [d["score"] for d in body["data"]] if "data" in body else [r["relevance_score"] for r in body["results"]]


def _ranking(body: dict) -> list:
    """What must be the same whichever engine answers: each score's index (and a rerank's document)."""
    return [d["index"] for d in body["data"]] if "data" in body else \
        [(r["index"], r["document"]) for r in body["results"]]
