"""The resources for a set of settings: built once at an edge (the code location, the API app, the CLI).

Secrets never become plain resource config inside Dagster, whose UI shows config: a secret read from the
environment is passed as ``EnvVar(name)`` (resolved in the run), and the managed Label Studio's token and
webhook secret are read at run time from its credentials file. Outside Dagster (``defer_secrets=False``:
the API and the CLI, which show no config) the values are used as they are.
"""

from __future__ import annotations

import os

from dagster import ConfigurableResource, EnvVar

from resources.file_store import FileStore
from resources.inference_engine import InferenceEngine
from resources.label_studio import LabelStudio
from resources.metadata_db import MetadataDB
from resources.model_registry import ModelRegistry
from resources.retention_policy import RetentionPolicy
from resources.retraining_policy import RetrainingPolicy
from resources.trainer import Trainer
from vbatch_pipelines.settings import Settings, SettingsError


def build_resources(settings: Settings, *, defer_secrets: bool = True,
                    extensions: list | None = None) -> dict[str, ConfigurableResource]:
    """The core's resources and those of the enabled ``extensions`` (None: ask ``enabled_extensions``)."""
    from vbatch_pipelines.extensions import enabled_extensions

    def secret(name: str, value: str | None):
        if defer_secrets and value is not None and os.environ.get(name) == value:
            return EnvVar(name)
        return value

    file_store = settings.layout()
    metadata_db = MetadataDB(url=secret("VBATCH_DATABASE_URL", settings.database_url))
    model_registry = ModelRegistry(metadata_db=metadata_db, file_store=file_store, models=settings.models,
                                   default_model=settings.default_model,
                                   model_sources=[str(p) for p in settings.model_sources],
                                   allow_remote_code=settings.allow_remote_code)
    added = {}
    for extension in extensions if extensions is not None else enabled_extensions(settings.extensions):
        if extension.resources is not None:
            added.update(extension.resources(settings, secret))
    return {
        **added,
        "metadata_db": metadata_db,
        "file_store": file_store,
        "model_registry": model_registry,
        "inference_engine": InferenceEngine(
            file_store=file_store,
            model_registry=model_registry,
            backend=settings.engine_backend,
            vllm_python=settings.vllm_python,
            envs_dir=str(settings.envs_dir),
            gpus=settings.gpus,
            max_lora_rank=settings.max_lora_rank,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_fraction if settings.gpus else None,
            kv_cache_sequences=settings.kv_cache_sequences, engine_slots=settings.engine_slots,
            plan_batches=settings.plan_batches,
            external_engines=[f"{model}={url}" for model, url in settings.engines],
            external_engines_api_key=secret("VBATCH_ENGINES_API_KEY", settings.engines_api_key),
            tool_parsers=dict(settings.tool_parsers),
            node=settings.node, engine_host=settings.engine_host,
        ),
        "trainer": Trainer(backend=settings.trainer, gpus=settings.gpus, envs_dir=str(settings.envs_dir),
                           min_training_examples=settings.min_training_examples,
                           max_lora_rank=settings.max_lora_rank),
        "label_studio": _label_studio(settings, file_store, secret),
        "retraining_policy": RetrainingPolicy(
            model=settings.retrain_model, hyperparameters=settings.retrain_hyperparameters,
            min_gold_stars=settings.retrain_min_gold_stars, deploy_gate=settings.deploy_gate,
            gate_metric=settings.gate_metric, judge_model=settings.judge_model,
            eval_set=settings.retrain_eval_set),
        "retention_policy": RetentionPolicy(
            file_retention_days=settings.file_retention_days, run_retention_days=settings.run_retention_days,
            log_max_bytes=settings.log_max_bytes, log_backups=settings.log_backups,
            min_free_disk_percent=settings.min_free_disk_percent),
    }


def _label_studio(settings: Settings, file_store: FileStore, secret) -> LabelStudio:
    """External (VBATCH_LABEL_STUDIO_URL), managed by vbatch, or disabled with the reason. A disabled managed
    one still knows its server, so `vbatch label-studio` and `vbatch up` can start and stop it."""
    common = {"webhook_url": f"http://127.0.0.1:{settings.api_port}/v1/webhooks/label-studio",
              "webhook_secret": secret("VBATCH_WEBHOOK_SECRET", settings.webhook_secret),
              "token": secret("VBATCH_LABEL_STUDIO_TOKEN", settings.label_studio_token)}
    if settings.label_studio_url:
        if not settings.curation:
            return LabelStudio(enabled=False, disabled_reason="curation is off (VBATCH_CURATION=off)")
        if not settings.label_studio_token:
            raise SettingsError("VBATCH_LABEL_STUDIO_URL is set: set VBATCH_LABEL_STUDIO_TOKEN to its API token")
        return LabelStudio(url=settings.label_studio_url.rstrip("/"), **common)
    managed = {"url": f"http://127.0.0.1:{settings.label_studio_port}", "managed_dir": str(file_store.label_studio_dir),
               "managed_port": settings.label_studio_port, "envs_dir": str(settings.envs_dir),
               "managed_database_url": secret("VBATCH_LABEL_STUDIO_DATABASE_URL", settings.label_studio_database_url),
               **common}
    if not settings.curation:
        return LabelStudio(enabled=False, disabled_reason="curation is off (VBATCH_CURATION=off)", **managed)
    label_studio = LabelStudio(**managed)
    if not label_studio.server().installed():
        return LabelStudio(enabled=False, disabled_reason="Label Studio is not installed (run `vbatch label-studio "
                                                          "install`)", **managed)
    return label_studio
