"""/v1/models: what vbatch can serve."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends

from api.deps import get_settings
from api.errors import OpenAIError
from vbatch_pipelines.models.registry import ModelNotFound, ModelSpec, base_models, lookup_model
from vbatch_pipelines.settings import Settings

router = APIRouter(tags=["models"])


def _model_object(spec: ModelSpec) -> dict:
    path = Path(spec.path)
    created = int(path.stat().st_mtime) if path.exists() else 0
    return {"id": spec.id, "object": "model", "created": created, "owned_by": "vbatch", "root": spec.id,
            "parent": None}


@router.get("/models")
def list_models(settings: Settings = Depends(get_settings)) -> dict:
    return {"object": "list", "data": [_model_object(spec) for spec in base_models(settings).values()]}


@router.get("/models/{model_id:path}")
def retrieve_model(model_id: str, settings: Settings = Depends(get_settings)) -> dict:
    try:
        return _model_object(lookup_model(settings, model_id))
    except ModelNotFound as exc:
        raise OpenAIError(404, str(exc), param="model", code="model_not_found") from exc
