"""Conquest schemas: one Label Studio task schema per conquest type, read from ``conquest_schemas/<type>.json``
and registered with the core's task schemas when Aris is on. A batch whose metadata says
``{"aris": "conquest", "conquest_type": T}`` is reviewed with schema ``T`` (``conquest`` for a type without
one of its own); every conquest task carries ``conquest_id`` (its request's custom_id) in its data."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from vbatch_pipelines.curation.schemas import DIALOGUE, TaskSchema, register_schema, review_config

SCHEMAS_DIR = Path(__file__).with_name("conquest_schemas")
ID_FIELD = "conquest_id"
GENERIC = "conquest"


def _json_validator(answer_schema: dict):
    import jsonschema

    validator = jsonschema.Draft202012Validator(answer_schema)

    def validate(answer: str) -> str | None:
        try:
            value = json.loads(answer)
        except ValueError as exc:
            return f"not valid JSON: {exc}"
        error = next(iter(sorted(validator.iter_errors(value), key=lambda e: list(e.path))), None)
        if error is None:
            return None
        where = "/".join(str(p) for p in error.path) or "the answer"
        return f"not valid for this conquest type's JSON Schema at {where}: {error.message}"

    return validate


def _schema(spec: dict) -> TaskSchema:
    hint = "Corrected JSON (must match the schema)" if spec["kind"] == "json_extraction" else "Corrected analysis"
    return TaskSchema(
        name=spec["name"], description=spec["description"], label_config=review_config(DIALOGUE, hint),
        validate=_json_validator(spec["answer_schema"]) if spec.get("answer_schema") else (lambda answer: None),
        id_field=ID_FIELD)


@lru_cache(maxsize=1)
def conquest_schemas() -> dict[str, TaskSchema]:
    specs = [json.loads(path.read_text()) for path in sorted(SCHEMAS_DIR.glob("*.json"))]
    schemas = {spec["name"]: _schema(spec) for spec in specs}
    schemas[GENERIC] = _schema({"name": GENERIC, "kind": "review", "description": "Review a conquest's result: "
                                "fix it, rate it, gold-star it (a gold star is a VICTORY in Aristotle)."})
    return schemas


def conquest_schema_for(metadata: dict[str, str]) -> str | None:
    """The rule the core asks: a conquest batch's type names its schema."""
    if metadata.get("aris") != "conquest":
        return None
    kind = metadata.get("conquest_type")
    return kind if kind in conquest_schemas() else GENERIC


def register_conquest_schemas() -> None:
    for schema in conquest_schemas().values():
        register_schema(schema, conquest_schema_for)
