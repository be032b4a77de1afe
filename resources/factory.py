"""The resources for a set of settings: built once at an edge (the code location, the API app, the CLI).

Secrets never become plain resource config inside Dagster, whose UI shows config: a secret read from the
environment is passed as ``EnvVar(name)`` (resolved in the run), and the managed Label Studio's token and
webhook secret are read at run time from its credentials file. Outside Dagster (``defer_secrets=False``:
the API and the CLI, which show no config) the values are used as they are.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from dagster import EnvVar

from resources.file_store import FileStore
from resources.inference_engine import InferenceEngine
from resources.label_studio import LabelStudio
from resources.metadata_db import MetadataDB
from resources.model_registry import ModelRegistry
from resources.retention_policy import RetentionPolicy
from resources.retraining_policy import RetrainingPolicy
from resources.trainer import Trainer
from vbatch_pipelines.settings import Settings, SettingsError


@dataclass(frozen=True)
class Resources(Mapping):
    """The resources of one set of settings: typed attributes for the code that uses them, and a mapping by
    resource key (the extensions' too) for Dagster's ``Definitions`` and ``materialize``."""

    metadata_db: MetadataDB
    file_store: FileStore
    model_registry: ModelRegistry
    inference_engine: InferenceEngine
    trainer: Trainer
    label_studio: LabelStudio
    retraining_policy: RetrainingPolicy
    retention_policy: RetentionPolicy
    extensions: dict[str, Any] = field(default_factory=dict)  # the enabled extensions' own, by resource key

    @classmethod
    def core_keys(cls) -> list[str]:
        """The core's resource keys (every field but ``extensions``)."""
        return [f.name for f in fields(cls) if f.name != "extensions"]

    def replace(self, **changes: Any) -> Resources:
        """These resources with some replaced, by key (an extension's key replaces or adds one of its own)."""
        core = self.core_keys()
        extra = {key: value for key, value in changes.items() if key not in core}
        return dataclasses.replace(self, **{key: value for key, value in changes.items() if key in core},
                                   extensions={**self.extensions, **extra})

    def _by_key(self) -> dict[str, Any]:
        return {**self.extensions, **{key: getattr(self, key) for key in self.core_keys()}}

    def __getitem__(self, key: str) -> Any:
        return self._by_key()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_key())

    def __len__(self) -> int:
        return len(self._by_key())


def build_resources(settings: Settings, *, defer_secrets: bool = True, extensions: list | None = None) -> Resources:
    """The core's resources and those of the enabled ``extensions`` (None: ask ``enabled_extensions``)."""
    from vbatch_pipelines.extensions import enabled_extensions

    def secret(name: str, value: str | None):
        if defer_secrets and value is not None and os.environ.get(name) == value:
            return EnvVar(name)
        return value

    def group(name: str, *, secrets: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """A settings group as a resource's config (but ``exclude``), its ``secrets`` as EnvVar."""
        values = getattr(settings, name)
        return {key: secret(type(values).env_of(key), value) if key in secrets else value
                for key, value in values.model_dump(exclude=set(exclude)).items()}

    file_store = settings.layout()
    metadata_db = MetadataDB(url=secret("VBATCH_DATABASE_URL", settings.storage.database_url))
    model_registry = ModelRegistry(metadata_db=metadata_db, file_store=file_store, **group("registry"))
    added = {}
    for extension in extensions if extensions is not None else enabled_extensions(settings.extensions.enabled):
        if extension.resources is not None:
            added.update(extension.resources(settings.extension_settings.get(extension.name), secret))
    envs_dir = str(settings.storage.envs_dir)
    return Resources(
        metadata_db=metadata_db, file_store=file_store, model_registry=model_registry,
        inference_engine=InferenceEngine(file_store=file_store, model_registry=model_registry, envs_dir=envs_dir,
                                         **group("engine", secrets=("external_engines_api_key",))),
        trainer=Trainer(envs_dir=envs_dir, gpus=settings.engine.gpus, max_lora_rank=settings.engine.max_lora_rank,
                        **group("training")),
        label_studio=_label_studio(settings, file_store, secret),
        retraining_policy=RetrainingPolicy(**group("retrain", exclude=("cron",))),
        retention_policy=RetentionPolicy(**group("retention", exclude=("cron",))),
        extensions=added,
    )


def _label_studio(settings: Settings, file_store: FileStore, secret) -> LabelStudio:
    """External (VBATCH_LABEL_STUDIO_URL), managed by vbatch, or disabled with the reason. A disabled managed
    one still knows its server, so `vbatch label-studio` and `vbatch up` can start and stop it."""
    common = {"webhook_url": f"http://127.0.0.1:{settings.api.port}/v1/webhooks/label-studio",
              "webhook_secret": secret("VBATCH_WEBHOOK_SECRET", settings.curation.webhook_secret),
              "token": secret("VBATCH_LABEL_STUDIO_TOKEN", settings.curation.label_studio_token)}
    if settings.curation.label_studio_url:
        if not settings.curation.enabled:
            return LabelStudio(enabled=False, disabled_reason="curation is off (VBATCH_CURATION=off)")
        if not settings.curation.label_studio_token:
            raise SettingsError("VBATCH_LABEL_STUDIO_URL is set: set VBATCH_LABEL_STUDIO_TOKEN to its API token")
        return LabelStudio(url=settings.curation.label_studio_url.rstrip("/"), **common)
    port = settings.curation.label_studio_port
    managed = {"url": f"http://127.0.0.1:{port}", "managed_dir": str(file_store.label_studio_dir),
               "managed_port": port, "envs_dir": str(settings.storage.envs_dir),
               "managed_database_url": secret("VBATCH_LABEL_STUDIO_DATABASE_URL",
                                              settings.curation.label_studio_database_url),
               **common}
    if not settings.curation.enabled:
        return LabelStudio(enabled=False, disabled_reason="curation is off (VBATCH_CURATION=off)", **managed)
    label_studio = LabelStudio(**managed)
    if not label_studio.server().installed():
        return LabelStudio(enabled=False, disabled_reason="Label Studio is not installed (run `vbatch label-studio "
                                                          "install`)", **managed)
    return label_studio
