"""Which models vbatch can serve, and which one a request gets when it names none.

Base models come from ``VBATCH_MODELS`` (``name=path`` pairs). With none configured and no GPU, the
locally built tiny chat model is served (built on first use). ``VBATCH_DEFAULT_MODEL`` picks the default
among them; otherwise it is the first configured model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vbatch_pipelines.settings import TINY_MODEL_ID, Settings


@dataclass(frozen=True)
class ModelSpec:
    id: str
    path: str


class ModelNotFound(LookupError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(
            f"The model {name!r} does not exist or is not served here; available: {', '.join(known) or 'none'}"
        )


def base_models(settings: Settings) -> dict[str, ModelSpec]:
    models = {name: ModelSpec(name, path) for name, path in settings.models.items()}
    if not models:
        models[TINY_MODEL_ID] = ModelSpec(TINY_MODEL_ID, str(settings.tiny_model_path))
    return models


def default_model_id(settings: Settings) -> str:
    models = base_models(settings)
    if settings.default_model:
        if settings.default_model not in models:
            raise ModelNotFound(settings.default_model, list(models))
        return settings.default_model
    return next(iter(models))


def lookup_model(settings: Settings, name: str | None) -> ModelSpec:
    """The model a request names (None: the default); raises ModelNotFound. Touches nothing on disk."""
    models = base_models(settings)
    spec = models.get(name or default_model_id(settings))
    if spec is None:
        raise ModelNotFound(name or "", list(models))
    return spec


def prepare_model(settings: Settings, spec: ModelSpec) -> ModelSpec:
    """Make sure the model's files exist (the tiny model is built on first use)."""
    if spec.id == TINY_MODEL_ID and spec.path == str(settings.tiny_model_path):
        ensure_tiny_model(settings)
    return spec


def ensure_tiny_model(settings: Settings) -> Path:
    """Build the tiny model under VBATCH_HOME once (a lock keeps concurrent builders apart)."""
    from filelock import FileLock

    path = settings.tiny_model_path
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / "config.json").exists():
            from vbatch_pipelines.models.tiny import create_tiny_model

            tmp = path.with_name(path.name + ".building")
            create_tiny_model(tmp)
            tmp.rename(path)
    return path
