"""Which models vbatch can serve, and which one a request gets when it names none.

Base models come from ``VBATCH_MODELS`` (``name=path`` pairs) and from the model store (``installed_model``,
rows of the ``models`` table with status ``ready``). With none configured, the locally built tiny chat
model is served too (built on first use). Fine-tunes are served as LoRA adapters on their base model's
engine once deployed (status ``deployed``). ``VBATCH_DEFAULT_MODEL`` picks the default; otherwise it is
the first configured model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from vbatch_pipelines.settings import TINY_MODEL_ID, Settings

READY = "ready"  # an installed base model that can be served
DEPLOYED = "deployed"  # a fine-tune whose adapter is served


@dataclass(frozen=True)
class ModelSpec:
    id: str  # the name requests use
    path: str  # the base model's weights
    parent: str | None = None  # a fine-tune's base model id
    adapter: str | None = None  # a fine-tune's LoRA adapter dir
    trust_remote_code: bool = False

    @property
    def base(self) -> ModelSpec:
        """The base model whose engine serves this one."""
        if self.parent is None:
            return self
        return ModelSpec(self.parent, self.path, trust_remote_code=self.trust_remote_code)

    def with_adapter(self, name: str, adapter: str) -> ModelSpec:
        return replace(self.base, id=name, parent=self.base.id, adapter=adapter)


class ModelNotFound(LookupError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(
            f"The model {name!r} does not exist or is not served here; available: {', '.join(known) or 'none'}"
        )


def _db(settings: Settings):
    from vbatch_pipelines.store.db import get_database

    return get_database(settings.database_url)


def _rows(settings: Settings, kind: str, status: str):
    from sqlalchemy import select

    from vbatch_pipelines.store.models import Model

    with _db(settings).session() as session:
        return list(session.scalars(select(Model).where(Model.kind == kind, Model.status == status)
                                    .order_by(Model.created_at)))


def configured_models(settings: Settings) -> dict[str, ModelSpec]:
    models = {name: ModelSpec(name, path) for name, path in settings.models.items()}
    if not models:
        models[TINY_MODEL_ID] = ModelSpec(TINY_MODEL_ID, str(settings.tiny_model_path))
    return models


def base_models(settings: Settings) -> dict[str, ModelSpec]:
    models = configured_models(settings)
    for row in _rows(settings, "base", READY):
        models.setdefault(row.id, ModelSpec(row.id, row.path, trust_remote_code=row.trust_remote_code))
    return models


def fine_tuned_models(settings: Settings, base: str | None = None) -> dict[str, ModelSpec]:
    """Deployed fine-tunes (of ``base`` only, when given) whose base model is still served."""
    bases = base_models(settings)
    return {row.id: bases[row.parent].with_adapter(row.id, row.path)
            for row in _rows(settings, "fine_tune", DEPLOYED)
            if row.parent in bases and (base is None or row.parent == base)}


def served_models(settings: Settings) -> dict[str, ModelSpec]:
    return {**base_models(settings), **fine_tuned_models(settings)}


def default_model_id(settings: Settings) -> str:
    if settings.default_model:
        if settings.default_model not in base_models(settings):
            raise ModelNotFound(settings.default_model, list(base_models(settings)))
        return settings.default_model
    return next(iter(configured_models(settings)))


def lookup_model(settings: Settings, name: str | None) -> ModelSpec:
    """The model a request names (None: the default); raises ModelNotFound. Reads no weights."""
    name = name or default_model_id(settings)
    configured = configured_models(settings)
    if name in configured:  # the hot path: no DB read
        return configured[name]
    from vbatch_pipelines.store.models import Model

    row = _db(settings).get(Model, name)
    if row is not None and row.kind == "base" and row.status == READY:
        return ModelSpec(row.id, row.path, trust_remote_code=row.trust_remote_code)
    if row is not None and row.kind == "fine_tune" and row.status == DEPLOYED:
        try:
            return lookup_model(settings, row.parent).with_adapter(row.id, row.path)
        except ModelNotFound:
            pass
    raise ModelNotFound(name, list(served_models(settings)))


def prepare_model(settings: Settings, spec: ModelSpec) -> ModelSpec:
    """Make sure the model's files exist (the tiny model is built on first use)."""
    if spec.base.id == TINY_MODEL_ID and spec.path == str(settings.tiny_model_path):
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
