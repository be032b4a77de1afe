"""Which models vbatch serves, and which one a request gets when it names none.

Base models come from configuration (``VBATCH_MODELS``, ``name=path`` pairs) and from the model store
(``installed_model``: rows of the ``models`` table with status ``ready``). With none configured, the
locally built tiny chat model is served (built on first use). Fine-tunes are served as LoRA adapters on
their base model's engine once deployed (status ``deployed``). ``default_model`` picks the default;
otherwise it is the first configured model.
"""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from resources.file_store import FileStore
from resources.metadata_db import MetadataDB
from vbatch_pipelines.models.registry import (
    DEPLOYED,
    READY,
    TINY_MODEL_ID,
    ModelNotFound,
    ModelSpec,
    ensure_tiny_model,
)


class ModelRegistry(ConfigurableResource):
    metadata_db: MetadataDB
    file_store: FileStore
    models: dict[str, str] = Field(default_factory=dict,
                                   description="configured base models, name -> path (VBATCH_MODELS)")
    default_model: str | None = Field(default=None, description="VBATCH_DEFAULT_MODEL; default: the first configured")
    model_sources: list[str] = Field(default_factory=list, description="directories API installs may take local "
                                     "models from (VBATCH_MODEL_SOURCES); default: the models directory")
    allow_remote_code: bool = Field(default=False, description="whether installs may set trust_remote_code "
                                    "(VBATCH_ALLOW_REMOTE_CODE)")

    @property
    def models_dir(self):
        """Where installed models are downloaded to."""
        return self.file_store.models_dir

    def install_policy(self):
        """The server's rule for installs requested through the API."""
        from pathlib import Path

        from vbatch_pipelines.models.install import InstallPolicy

        sources = tuple(Path(p).expanduser().resolve() for p in self.model_sources) or (self.models_dir.resolve(),)
        return InstallPolicy(local_sources=sources, remote_code=self.allow_remote_code)

    def _rows(self, kind: str, status: str):
        from sqlalchemy import select

        from vbatch_pipelines.store.models import Model

        with self.metadata_db.db.session() as session:
            return list(session.scalars(select(Model).where(Model.kind == kind, Model.status == status)
                                        .order_by(Model.created_at)))

    def configured_models(self) -> dict[str, ModelSpec]:
        models = {name: ModelSpec(name, path) for name, path in self.models.items()}
        if not models:
            models[TINY_MODEL_ID] = ModelSpec(TINY_MODEL_ID, str(self.file_store.tiny_model_path))
        return models

    def base_models(self) -> dict[str, ModelSpec]:
        models = self.configured_models()
        for row in self._rows("base", READY):
            models.setdefault(row.id, ModelSpec(row.id, row.path, trust_remote_code=row.trust_remote_code))
        return models

    def fine_tuned_models(self, base: str | None = None) -> dict[str, ModelSpec]:
        """Deployed fine-tunes (of ``base`` only, when given) whose base model is still served."""
        bases = self.base_models()
        return {row.id: bases[row.parent].with_adapter(row.id, row.path)
                for row in self._rows("fine_tune", DEPLOYED)
                if row.parent in bases and (base is None or row.parent == base)}

    def served_models(self) -> dict[str, ModelSpec]:
        return {**self.base_models(), **self.fine_tuned_models()}

    def default_model_id(self) -> str:
        if self.default_model:
            if self.default_model not in self.base_models():
                raise ModelNotFound(self.default_model, list(self.base_models()))
            return self.default_model
        return next(iter(self.configured_models()))

    def lookup(self, name: str | None) -> ModelSpec:
        """The model a request names (None: the default); raises ModelNotFound. Reads no weights."""
        name = name or self.default_model_id()
        configured = self.configured_models()
        if name in configured:  # the hot path: no DB read
            return configured[name]
        from vbatch_pipelines.store.models import Model

        row = self.metadata_db.db.get(Model, name)
        if row is not None and row.kind == "base" and row.status == READY:
            return ModelSpec(row.id, row.path, trust_remote_code=row.trust_remote_code)
        if row is not None and row.kind == "fine_tune" and row.status == DEPLOYED:
            try:
                return self.lookup(row.parent).with_adapter(row.id, row.path)
            except ModelNotFound:
                pass
        raise ModelNotFound(name, list(self.served_models()))

    def served_id(self, name: str | None) -> str:
        """The id a request's model name is served as (how batch validation resolves names)."""
        return self.lookup(name).id

    def prepare(self, spec: ModelSpec) -> ModelSpec:
        """Make sure the model's files exist (the tiny model is built on first use)."""
        tiny = self.file_store.tiny_model_path
        if spec.base.id == TINY_MODEL_ID and spec.path == str(tiny):
            ensure_tiny_model(tiny)
        return spec

    def resolve(self, name: str | None) -> ModelSpec:
        """``lookup`` then ``prepare``: the model ready to load."""
        return self.prepare(self.lookup(name))
