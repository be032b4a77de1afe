"""Which models vbatch serves, and which one a request gets when it names none.

Base models come from configuration (``VBATCH_MODELS``, ``name=path`` pairs) and from the model store
(``installed_model``: rows of the ``models`` table with status ``ready``). With none configured, the
locally built tiny chat and embedding models are served (each built on first use). Fine-tunes are served as
LoRA adapters on their base model's engine once deployed (status ``deployed``).

Each base model generates (chat, completions), embeds, or scores pairs (a cross-encoder): a ``:embed`` /
``:generate`` suffix on its VBATCH_MODELS path says which, else its files do (``detect_task``: a one-label
``*ForSequenceClassification`` architecture means a cross-encoder, a sentence-transformers pooling module or
an encoder-only architecture means embeddings). Score and rerank are served by embedding models (cosine) and
cross-encoders. A request for an endpoint its model cannot serve is refused (``for_endpoint``).
``default_model`` picks the default; otherwise it is the first configured model, and for another endpoint the
first configured model that serves it.
"""

from __future__ import annotations

from resources.config import config_of
from resources.file_store import FileStore
from resources.metadata_db import MetadataDB
from vbatch_pipelines.models.registry import (
    DEPLOYED,
    ENDPOINT_TASKS,
    GENERATE,
    READY,
    TINY_EMBED_MODEL_ID,
    TINY_MODEL_ID,
    ModelNotFound,
    ModelSpec,
    ModelTaskMismatch,
    detect_task,
    dimensions_error,
    parse_model_entry,
)
from vbatch_pipelines.models.tiny import ensure_tiny_model
from vbatch_pipelines.settings import RegistrySettings


class ModelRegistry(config_of(RegistrySettings)):
    """The configured base models (RegistrySettings) over the metadata DB's installed and fine-tuned ones."""

    metadata_db: MetadataDB
    file_store: FileStore

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
        models = {}
        for name, entry in self.models.items():
            path, task = parse_model_entry(entry)
            models[name] = ModelSpec(name, path, task=task or detect_task(path))
        if not models:
            models[TINY_MODEL_ID] = ModelSpec(TINY_MODEL_ID, str(self.file_store.tiny_model_path))
            models[TINY_EMBED_MODEL_ID] = ModelSpec(TINY_EMBED_MODEL_ID, str(self.file_store.tiny_embed_model_path),
                                                    task="embed")
        return models

    @staticmethod
    def _installed(row) -> ModelSpec:
        return ModelSpec(row.id, row.path, trust_remote_code=row.trust_remote_code, task=detect_task(row.path))

    def base_models(self) -> dict[str, ModelSpec]:
        models = self.configured_models()
        for row in self._rows("base", READY):
            models.setdefault(row.id, self._installed(row))
        return models

    def fine_tuned_models(self, base: str | None = None, project: str | None = None) -> dict[str, ModelSpec]:
        """Deployed fine-tunes (of ``base`` only, when given) whose base model is still served; with ``project``,
        only those that project may use (its own and shared ones). Without, all of them: what engines load."""
        bases = self.base_models()
        return {row.id: bases[row.parent].with_adapter(row.id, row.path)
                for row in self._rows("fine_tune", DEPLOYED)
                if row.parent in bases and (base is None or row.parent == base)
                and (project is None or row.visible_to(project))}

    def served_models(self, project: str | None = None) -> dict[str, ModelSpec]:
        """What is served (to ``project``: base models, its fine-tunes and shared ones)."""
        return {**self.base_models(), **self.fine_tuned_models(project=project)}

    def default_model_id(self, tasks: tuple[str, ...] = (GENERATE,)) -> str:
        """The model a request naming none gets: VBATCH_DEFAULT_MODEL, else the first configured model; when
        that one does none of ``tasks`` (an embeddings request, a chat model first), the first served model
        that does. With none that can, the default all the same (the request is then refused naming why)."""
        configured = self.configured_models()
        if self.default_model:
            bases = self.base_models()
            if self.default_model not in bases:
                raise ModelNotFound(self.default_model, list(bases))
            default = bases[self.default_model]
        else:
            default = next(iter(configured.values()))
        if default.task in tasks:
            return default.id
        candidates = configured if any(m.task in tasks for m in configured.values()) else self.base_models()
        for spec in candidates.values():
            if spec.task in tasks:
                return spec.id
        return default.id

    def lookup(self, name: str | None, tasks: tuple[str, ...] = (GENERATE,), project: str | None = None) -> ModelSpec:
        """The model a request names (None: the default for ``tasks``); raises ModelNotFound, also for another
        project's fine-tune when ``project`` is given (never confirming it exists). Reads no weights."""
        name = name or self.default_model_id(tasks)
        configured = self.configured_models()
        if name in configured:  # the hot path: no DB read
            return configured[name]
        from vbatch_pipelines.store.models import Model

        row = self.metadata_db.db.get(Model, name)
        if row is not None and row.kind == "base" and row.status == READY:
            return self._installed(row)
        if row is not None and row.kind == "fine_tune" and row.status == DEPLOYED and \
                (project is None or row.visible_to(project)):
            try:
                return self.lookup(row.parent).with_adapter(row.id, row.path)
            except ModelNotFound:
                pass
        raise ModelNotFound(name, list(self.served_models(project)))

    def for_endpoint(self, name: str | None, endpoint: str, project: str | None = None) -> ModelSpec:
        """The model a request to ``endpoint`` names (None: the endpoint's default) for ``project``;
        ModelNotFound, or ModelTaskMismatch when the model cannot serve that endpoint."""
        tasks = ENDPOINT_TASKS.get(endpoint, (GENERATE,))
        spec = self.lookup(name, tasks, project)
        if spec.task not in tasks:
            raise ModelTaskMismatch(spec, endpoint, [m.id for m in self.base_models().values() if m.task in tasks])
        return spec

    def resolver(self, endpoint: str, project: str | None) -> "EndpointResolver":
        """How a batch of ``project`` for ``endpoint`` resolves and checks its model (validate_batch_file's
        resolve_model)."""
        return EndpointResolver(self, endpoint, project)

    def prepare(self, spec: ModelSpec) -> ModelSpec:
        """Make sure the model's files exist (the tiny models are built on first use)."""
        for tiny_id, path in ((TINY_MODEL_ID, self.file_store.tiny_model_path),
                              (TINY_EMBED_MODEL_ID, self.file_store.tiny_embed_model_path)):
            if spec.base.id == tiny_id and spec.path == str(path):
                ensure_tiny_model(path, spec.task)
        return spec

    def resolve(self, name: str | None) -> ModelSpec:
        """``lookup`` then ``prepare``: the model ready to load."""
        return self.prepare(self.lookup(name))


class EndpointResolver:
    """A batch's model, resolved for its endpoint: the served id (or ModelNotFound / ModelTaskMismatch),
    and whether an embeddings line's ``dimensions`` suits it."""

    def __init__(self, registry: ModelRegistry, endpoint: str, project: str | None):
        self.registry, self.endpoint, self.project = registry, endpoint, project

    def __call__(self, name: str | None) -> str:
        return self.registry.for_endpoint(name, self.endpoint, self.project).id

    def dimensions_error(self, model_id: str, dimensions: int) -> str | None:
        spec = self.registry.lookup(model_id)
        if spec.path == str(self.registry.file_store.tiny_embed_model_path):
            self.registry.prepare(spec)  # its config says what it supports
        return dimensions_error(spec, dimensions)
