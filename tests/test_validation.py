"""Batch input validation: every kind of bad file gives a clear, line-numbered error and no Parquet."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance

from tests.conftest import chat_line, chat_lines, jsonl
from vbatch_pipelines.batch.validation import validate_batch_file


def _resolve(name):
    if name not in (None, "tiny"):
        raise LookupError(f"The model {name!r} does not exist")
    return "tiny"


def _validate(tmp_path, data: bytes, endpoint="/v1/chat/completions", **kwargs):
    source = tmp_path / "input.jsonl"
    source.write_bytes(data)
    out = tmp_path / "input.parquet"
    return validate_batch_file(source, endpoint=endpoint, resolve_model=_resolve, output=out, **kwargs), out


def test_valid_file_becomes_parquet(tmp_path):
    lines = chat_lines(50)
    report, out = _validate(tmp_path, jsonl(lines) + b"\n\n")  # blank lines are ignored
    assert report.ok and report.total == 50 and report.model == "tiny"
    table = pq.read_table(out)
    assert table.column("custom_id").to_pylist() == [line["custom_id"] for line in lines]
    assert table.column("line").to_pylist() == list(range(1, 51))
    assert json.loads(table.column("body")[0].as_py()) == lines[0]["body"]


GOOD = json.dumps(chat_line("ok-1", "hello")).encode()


@pytest.mark.parametrize(
    "data, code, line, param",
    [
        (GOOD + b"\n{not json\n", "invalid_json_line", 2, None),
        (GOOD + b"\n" + GOOD + b"\n", "duplicate_custom_id", 2, "custom_id"),
        (json.dumps({**chat_line("a", "x"), "url": "/v1/images"}).encode(), "invalid_url", 1, "url"),
        (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}).encode(),
         "missing_required_parameter", 1, "body"),
        (GOOD + b"\n" + b'{"custom_id": "b\xff\xfe", "method": "POST"}\n', "invalid_encoding", 2, None),
        (b"", "empty_file", None, None),
        (b"\n  \n", "empty_file", None, None),
        (json.dumps({**chat_line("a", "x"), "method": "GET"}).encode(), "invalid_method", 1, "method"),
        (json.dumps({**chat_line("a", "x"), "custom_id": ""}).encode(), "missing_required_parameter", 1, "custom_id"),
        (json.dumps({**chat_line("a", "x"), "url": "/v1/completions"}).encode(), "mismatched_endpoint", 1, "url"),
        (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"messages": [{"role": "wizard", "content": "x"}]}}).encode(),
         "invalid_request", 1, "body.messages[0].role"),
        (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"messages": []}}).encode(), "invalid_request", 1, "body.messages"),
        (json.dumps(chat_line("a", "x", model="tiny")).encode() + b"\n"
         + json.dumps(chat_line("b", "x", model="other")).encode(), "mismatched_model", 2, "body.model"),
        (json.dumps(chat_line("a", "x", model="nope")).encode(), "model_not_found", 1, "body.model"),
        (b"[1, 2]", "invalid_request", 1, None),
        (json.dumps(chat_line("a", "x", stream=True)).encode(), "invalid_request", 1, "body.stream"),
    ],
    ids=["malformed-json", "duplicate-id", "unknown-url", "missing-body", "non-utf8", "empty", "blank-only",
         "bad-method", "empty-id", "other-endpoint", "bad-role", "no-messages", "two-models", "unknown-model",
         "not-object", "streamed"],
)
def test_bad_file_reports_clear_error(tmp_path, data, code, line, param):
    report, out = _validate(tmp_path, data)
    assert not report.ok
    first = report.errors[0]
    assert (first["code"], first["line"], first["param"]) == (code, line, param), first
    assert first["message"]
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_ten_megabyte_line_is_rejected_without_loading_it(tmp_path):
    huge = json.dumps(chat_line("big", "x" * (10 * 1024 * 1024))).encode()
    report, out = _validate(tmp_path, GOOD + b"\n" + huge + b"\n" + json.dumps(chat_line("after", "y")).encode())
    assert [(e["code"], e["line"]) for e in report.errors] == [("line_too_large", 2)]
    assert "limit" in report.errors[0]["message"]
    assert report.total == 2  # the lines around it were still read and checked
    assert not out.exists()


def test_errors_are_capped_but_counted(tmp_path):
    report, _ = _validate(tmp_path, b"{bad\n" * 300, max_errors=10)
    assert report.error_count == 300 and len(report.errors) == 10
    assert report.openai_errors()["data"][-1]["code"] == "too_many_errors"


def test_bad_file_fails_its_batch_and_disturbs_nothing_else(platform):
    good = platform.submit(jsonl(chat_lines(5)))
    bad = platform.submit(GOOD + b"\n{oops\n")
    instance = DagsterInstance.ephemeral()
    result = platform.materialize(bad.id, instance=instance, raise_on_error=False)
    assert not result.success
    record = platform.batch(bad.id)
    assert record.status == "failed" and record.failed_at
    assert record.errors["data"][0] == {"code": "invalid_json_line", "line": 2, "param": None,
                                        "message": record.errors["data"][0]["message"]}
    assert platform.batch(good.id).status == "validating"  # untouched
    assert platform.materialize(good.id, instance=instance).success
    assert platform.batch(good.id).status == "completed"


@pytest.mark.parametrize("digests", ["real", "all colliding"])
@pytest.mark.parametrize("size", ["small file", "large file"])
def test_duplicate_custom_ids_are_found_by_line_and_digest_collisions_are_not_duplicates(tmp_path, monkeypatch, digests,
                                                                                         size):
    """custom_ids are kept as 8-byte digests; a repeated digest is checked against the ids themselves, so
    only true repeats are errors (each at the line that repeats), whatever the digests do. Large files count
    repeated digests with Arrow, small ones in a set."""
    from vbatch_pipelines.batch import validation

    if size == "large file":
        monkeypatch.setattr(validation, "SMALL_FILE_IDS", 0)
    if digests == "all colliding":
        monkeypatch.setattr(validation._SeenIds, "digest", staticmethod(lambda custom_id: 7))
    lines = chat_lines(6, prefix="dup")
    data = jsonl(lines + [chat_line("dup-2", "again"), chat_line("dup-5", "again"), chat_line("dup-2", "thrice")])
    report, out = _validate(tmp_path, data)
    assert [(e["code"], e["line"], e["param"]) for e in report.errors] == [
        ("duplicate_custom_id", 7, "custom_id"), ("duplicate_custom_id", 8, "custom_id"),
        ("duplicate_custom_id", 9, "custom_id")]
    assert "'dup-2'" in report.errors[0]["message"] and not out.exists()
    report, out = _validate(tmp_path, jsonl(lines))
    assert report.ok and pq.ParquetFile(out).metadata.num_rows == 6
