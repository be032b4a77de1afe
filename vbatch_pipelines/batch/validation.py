"""Stream-parse and validate an OpenAI batch input file into Parquet.

The file is read line by line in binary (a line longer than the limit is skipped over in chunks, never
held), so memory stays flat however large the file is; only the set of custom_ids grows with it.

Rules (OpenAI's, plus what a local server needs):
- every non-blank line is a JSON object ``{custom_id, method, url, body}``; blank lines are ignored;
- ``custom_id`` is a non-empty string, unique within the file;
- ``method`` is ``POST``; ``url`` is a supported endpoint and the batch's own endpoint (vLLM's own score and
  rerank paths, ``/score``, ``/rerank`` and ``/v2/rerank``, name ``/v1/score`` and ``/v1/rerank`` as in
  ``vllm run-batch`` files);
- ``body`` is an object valid for that endpoint (the same pydantic models the REST API uses), not streamed;
- models: a body may name a model or leave it out. Left out, the batch's model is used (the model the
  first naming line chose, else the server's default for the endpoint). All lines must name the same model,
  as OpenAI requires, and it must be one vbatch serves for that endpoint (an embedding model cannot chat);
  ``dimensions`` on an embeddings line must be one the model supports.
Every problem is reported OpenAI-style ``{code, line, message, param}`` (lines count from 1); the first
``max_errors`` are kept, all are counted. A file with any error produces no Parquet.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.processes import release_freed_memory
from vbatch_pipelines.protocol import ENDPOINT_ALIASES, ENDPOINT_REQUESTS, SUPPORTED_ENDPOINTS, canonical_endpoint

DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024
ROWS_PER_GROUP = 20_000


@dataclass
class ValidationReport:
    total: int = 0
    model: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def openai_errors(self) -> dict[str, Any]:
        data = list(self.errors)
        if self.error_count > len(data):
            data.append({"code": "too_many_errors", "line": None, "param": None,
                         "message": f"{self.error_count - len(data)} more errors not shown"})
        return {"object": "list", "data": data}


class BatchInputError(ValueError):
    """The input file failed validation; ``report`` holds every error found."""

    def __init__(self, report: ValidationReport):
        self.report = report
        first = report.errors[0] if report.errors else {}
        where = f" (line {first['line']})" if first.get("line") else ""
        super().__init__(
            f"Batch input failed validation with {report.error_count} error(s); first: "
            f"{first.get('code')}{where}: {first.get('message')}"
        )


def _loc(error: dict[str, Any]) -> str:
    parts = ["body"]
    for item in error.get("loc", ()):
        if isinstance(item, int):
            parts[-1] += f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def _iter_lines(stream: BinaryIO, max_line_bytes: int):
    """Yield (line_number, bytes or None if too long, length)."""
    number = 0
    while True:
        line = stream.readline(max_line_bytes + 1)
        if not line:
            return
        number += 1
        length = len(line)
        if length > max_line_bytes and not line.endswith(b"\n"):
            while True:  # skip the rest of the oversized line without holding it
                chunk = stream.readline(1024 * 1024)
                length += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield number, None, length
        else:
            yield number, line, length


def validate_batch_file(
    source: str | Path,
    *,
    endpoint: str,
    resolve_model: Callable[[str | None], str],
    output: str | Path | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_errors: int = 100,
) -> ValidationReport:
    """Validate ``source``; when it is valid and ``output`` is given, write the requests as Parquet.

    ``resolve_model(name)`` returns the served model id for a body's model name (None: the default) or
    raises LookupError (or a VbatchError, whose code is reported) with a message for the user. When it also
    has ``dimensions_error(model_id, dimensions)`` (``ModelRegistry.resolver``), each ``dimensions`` value
    the lines ask for is checked against the model, reported on the first line that asks for it.
    """
    report = ValidationReport()

    def error(code: str, line: int | None, message: str, param: str | None = None) -> None:
        report.error_count += 1
        if len(report.errors) < max_errors:
            report.errors.append({"code": code, "line": line, "message": message, "param": param})

    if endpoint not in ENDPOINT_REQUESTS:
        error("invalid_url", None, f"Endpoint {endpoint!r} is not supported; use one of {', '.join(SUPPORTED_ENDPOINTS)}",
              "endpoint")
        return report
    request_model = ENDPOINT_REQUESTS[endpoint]

    writer = _ParquetSink(output) if output is not None else None
    seen = _SeenIds()
    named_model: str | None = None
    named_line = 0
    dimensions: dict[int, int] = {}  # each distinct `dimensions` value asked for -> its first line
    try:
        with open(source, "rb") as stream:
            for number, raw, length in _iter_lines(stream, max_line_bytes):
                report.bytes_read += length
                if raw is None:
                    error("line_too_large", number,
                          f"Line is {length} bytes; the limit is {max_line_bytes} bytes per request")
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    error("invalid_encoding", number, f"Line is not valid UTF-8 (byte {exc.start}: {exc.reason})")
                    continue
                if not text.strip():
                    continue
                try:
                    item = json.loads(text)
                except json.JSONDecodeError as exc:
                    error("invalid_json_line", number, f"Line is not valid JSON: {exc.msg} at column {exc.colno}")
                    continue
                if not isinstance(item, dict):
                    error("invalid_request", number, "Line must be a JSON object")
                    continue
                report.total += 1
                custom_id = item.get("custom_id")
                if not isinstance(custom_id, str) or not custom_id:
                    error("missing_required_parameter", number, "custom_id must be a non-empty string", "custom_id")
                    custom_id = None
                else:
                    seen.add(custom_id)
                if item.get("method") != "POST":
                    error("invalid_method", number, f"method must be POST, got {item.get('method')!r}", "method")
                url = item.get("url")
                if canonical_endpoint(url) not in ENDPOINT_REQUESTS:
                    error("invalid_url", number, f"url {url!r} is not supported; use one of "
                          f"{', '.join(SUPPORTED_ENDPOINTS + tuple(ENDPOINT_ALIASES))}", "url")
                    continue
                if canonical_endpoint(url) != endpoint:
                    error("mismatched_endpoint", number,
                          f"url {url!r} differs from the batch's endpoint {endpoint!r}", "url")
                    continue
                body = item.get("body")
                if not isinstance(body, dict):
                    error("missing_required_parameter", number, "body must be a JSON object", "body")
                    continue
                try:
                    request_model.model_validate(body)
                except ValidationError as exc:
                    first = exc.errors()[0]
                    error("invalid_request", number, f"{_loc(first)}: {first['msg']}", _loc(first))
                    continue
                if isinstance(body.get("dimensions"), int):
                    dimensions.setdefault(body["dimensions"], number)
                if body.get("stream"):
                    error("invalid_request", number, "stream is not supported in batch requests", "body.stream")
                    continue
                name = body.get("model")
                if name is not None:
                    if named_model is None:
                        named_model, named_line = name, number
                    elif name != named_model:
                        error("mismatched_model", number,
                              f"All requests in a batch must use the same model: line {named_line} uses "
                              f"{named_model!r}, this line {name!r}", "body.model")
                        continue
                if writer is not None and report.error_count == 0 and custom_id is not None:
                    writer.add(number, custom_id, body)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

    for number, custom_id in seen.repeated(source, max_line_bytes):
        error("duplicate_custom_id", number,
              f"The custom_id {custom_id!r} is used more than once; custom_ids must be unique", "custom_id")
    if report.total == 0 and report.error_count == 0:
        error("empty_file", None, "The input file contains no requests")
    if report.error_count == 0:
        try:
            report.model = resolve_model(named_model)
        except (LookupError, VbatchError) as exc:
            error(getattr(exc, "code", None) or "model_not_found", named_line or None,
                  str(exc.args[0] if exc.args else exc), "body.model")
        check = getattr(resolve_model, "dimensions_error", None)
        if report.model is not None and check is not None:
            for value, number in sorted(dimensions.items(), key=lambda item: item[1]):
                message = check(report.model, value)
                if message:
                    error("invalid_value", number, message, "body.dimensions")
    if writer is not None:
        if report.error_count:
            writer.abort()
        else:
            writer.close()
    release_freed_memory()  # a pass over a large file churns through as many objects as it has lines
    return report


SMALL_FILE_IDS = 50_000


class _SeenIds:
    """The custom_ids of a file, kept as 8-byte digests in a flat array: a set of a million id strings would
    take ~100 MB. Ids whose digests repeat are checked against the ids themselves in a second pass, which
    runs only when a digest repeats (a duplicate, or a one-in-10^7 collision for a million ids)."""

    def __init__(self) -> None:
        from array import array

        self.digests = array("Q")

    @staticmethod
    def digest(custom_id: str) -> int:
        from hashlib import blake2b

        return int.from_bytes(blake2b(custom_id.encode(), digest_size=8).digest(), "little")

    def add(self, custom_id: str) -> None:
        self.digests.append(self.digest(custom_id))

    def repeated(self, source: str | Path, max_line_bytes: int) -> Iterator[tuple[int, str]]:
        """(line, custom_id) of every line that repeats an earlier line's custom_id."""
        if len(self.digests) < 2:
            return
        if len(self.digests) <= SMALL_FILE_IDS:  # a set of this many ints is small; Arrow is not imported
            suspects, once = set(), set()
            for value in self.digests:
                (suspects if value in once else once).add(value)
            del once
        else:
            import pyarrow as pa
            import pyarrow.compute as pc

            counts = pc.value_counts(pa.array(self.digests, pa.uint64()))
            suspects = set(pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist())
            del counts
        if not suspects:
            return
        first_line: dict[str, int] = {}
        with open(source, "rb") as stream:
            for number, raw, _ in _iter_lines(stream, max_line_bytes):
                try:
                    custom_id = json.loads(raw).get("custom_id")
                except (TypeError, ValueError, AttributeError):
                    continue
                if isinstance(custom_id, str) and custom_id and self.digest(custom_id) in suspects:
                    if custom_id in first_line:
                        yield number, custom_id
                    else:
                        first_line[custom_id] = number


class _ParquetSink:
    """Writes (line, custom_id, body) rows in row groups, then renames into place (atomic)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: tuple[list, list, list] = ([], [], [])
        self._writer = None

    def add(self, line: int, custom_id: str, body: dict[str, Any]) -> None:
        lines, ids, bodies = self._rows
        lines.append(line)
        ids.append(custom_id)
        bodies.append(json.dumps(body, separators=(",", ":"), ensure_ascii=False))  # ~10x smaller than the dict
        if len(lines) >= ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        lines, ids, bodies = self._rows
        if not lines:
            return
        table = pa.table({"line": pa.array(lines, pa.int64()), "custom_id": pa.array(ids, pa.string()),
                          "body": pa.array(bodies, pa.large_string())})
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, table.schema, compression="zstd")
        self._writer.write_table(table)
        self._rows = ([], [], [])

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self.tmp.replace(self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.tmp.unlink(missing_ok=True)
