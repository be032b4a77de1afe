"""Review schemas as plain JSON files, no code: one file per schema in a folder (``VBATCH_REVIEW_SCHEMAS_DIR``, an
extension's ``schemas_dir``)::

    {"name": "invoice_fields", "kind": "json_extraction", "title": "Invoice fields",
     "description": "Check the fields read from an invoice ...",
     "answer_schema": {"type": "object", "required": ["total"], ...}}

``kind`` is ``review`` (free text) or ``json_extraction`` (the answer must be JSON; ``answer_schema``, a JSON
Schema, checks it further). A batch picks one with ``metadata.curation_schema``. A bad file stops the edge that
loads it, naming the file; a name is a name (``^[a-z][a-z0-9_]{0,63}$``), never a path."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from vbatch_pipelines.curation.schemas import (
    BUILT_IN,
    DIALOGUE,
    SCHEMAS,
    TaskSchema,
    register_schema,
    review_config,
    validate_json,
)
from vbatch_pipelines.errors import VbatchError

NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
KINDS = ("review", "json_extraction")
MAX_FILE_BYTES = 256 * 1024
KEYS = {"name", "kind", "title", "description", "answer_schema"}


class SchemaFileError(VbatchError):
    code = "invalid_review_schema"


def json_answer_validator(answer_schema: dict[str, Any]):
    """An answer check: JSON, and valid for ``answer_schema`` (the first problem, by path)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(answer_schema)

    def validate(answer: str) -> str | None:
        problem = validate_json(answer)
        if problem:
            return problem
        error = next(iter(sorted(validator.iter_errors(json.loads(answer)), key=lambda e: list(e.path))), None)
        if error is None:
            return None
        where = "/".join(str(p) for p in error.path) or "the answer"
        return f"not valid for this schema's JSON Schema at {where}: {error.message}"

    return validate


def schema_of(spec: dict[str, Any], *, id_field: str | None = None) -> TaskSchema:
    """A task schema from a file's JSON; SchemaFileError says what is wrong with it."""
    import jsonschema

    unknown = set(spec) - KEYS
    if unknown:
        raise SchemaFileError(f"unknown key(s) {', '.join(sorted(unknown))}; a schema takes {', '.join(sorted(KEYS))}")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise SchemaFileError(f"name {name!r} must match {NAME.pattern}")
    kind = spec.get("kind", "review")
    if kind not in KINDS:
        raise SchemaFileError(f"kind {kind!r} must be one of {', '.join(KINDS)}")
    description = spec.get("description")
    if not isinstance(description, str) or not description.strip():
        raise SchemaFileError("description must say what reviewers check")
    answer_schema = spec.get("answer_schema")
    if answer_schema is not None:
        if kind != "json_extraction":
            raise SchemaFileError("answer_schema needs kind json_extraction")
        try:
            jsonschema.Draft202012Validator.check_schema(answer_schema)
        except jsonschema.SchemaError as exc:
            raise SchemaFileError(f"answer_schema is not a valid JSON Schema: {exc.message}") from None
    hint = {"review": "Corrected answer (edit the model's text)",
            "json_extraction": "Corrected JSON (must match the schema)" if answer_schema else "Corrected JSON "
                                                                                            "(must parse)"}[kind]
    validate = json_answer_validator(answer_schema) if answer_schema else \
        validate_json if kind == "json_extraction" else (lambda answer: None)
    return TaskSchema(name=name, description=description, label_config=review_config(DIALOGUE, hint),
                      validate=validate, id_field=id_field)


def load_schema_folder(folder: Path, *, id_field: str | None = None) -> dict[str, TaskSchema]:
    """Every ``*.json`` schema in ``folder`` (none: an empty or missing folder); the first bad file stops it,
    named."""
    schemas: dict[str, TaskSchema] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise SchemaFileError(f"larger than {MAX_FILE_BYTES // 1024} KiB")
            spec = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(spec, dict):
                raise SchemaFileError("it is not a JSON object")
            schema = schema_of(spec, id_field=id_field)
            if schema.name in BUILT_IN or schema.name in schemas:
                raise SchemaFileError(f"schema {schema.name!r} is already defined "
                                      f"({'built in' if schema.name in BUILT_IN else 'by another file here'})")
        except (ValueError, OSError, SchemaFileError) as exc:  # json.JSONDecodeError is a ValueError
            raise SchemaFileError(f"Review schema file {path}: {exc}") from None
        schemas[schema.name] = schema
    return schemas


def register_schema_folder(folder: Path, *, id_field: str | None = None) -> list[str]:
    """Register a folder's schemas (idempotent: the same folder twice changes nothing); their names."""
    found = load_schema_folder(folder, id_field=id_field)
    for schema in found.values():
        registered = SCHEMAS.get(schema.name)
        if registered is not None and registered.description != schema.description:
            raise SchemaFileError(f"Review schema {schema.name!r} in {folder} is already defined elsewhere")
        register_schema(schema)
    return list(found)
