"""Conquest schemas: one Label Studio task schema per conquest type, read from ``conquest_schemas/<type>.json``
and registered with the core's task schemas when Aris is on. A batch whose metadata says
``{"aris": "conquest", "conquest_type": T}`` is reviewed with schema ``T`` (``conquest`` for a type without
one of its own); every conquest task carries ``conquest_id`` (its request's custom_id) in its data."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from vbatch_pipelines.curation.schema_files import load_schema_folder, schema_of
from vbatch_pipelines.curation.schemas import TaskSchema, register_schema

SCHEMAS_DIR = Path(__file__).with_name("conquest_schemas")
ID_FIELD = "conquest_id"
GENERIC = "conquest"


@lru_cache(maxsize=1)
def conquest_schemas() -> dict[str, TaskSchema]:
    """The conquest types' schemas (the core's JSON schema files, each task carrying ``conquest_id``), and the
    generic one for a type without its own."""
    schemas = load_schema_folder(SCHEMAS_DIR, id_field=ID_FIELD)
    schemas[GENERIC] = schema_of({"name": GENERIC, "kind": "review", "description": "Review a conquest's result: "
                                  "fix it, rate it, gold-star it (a gold star is a VICTORY in Aristotle)."},
                                 id_field=ID_FIELD)
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
