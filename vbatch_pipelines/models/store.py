"""The model store's records: installed base models and deployed fine-tunes (the ``models`` table).

What is served is decided here (status ``ready`` / ``deployed``); the registry reads it, the engines
load it. Files live under ``$VBATCH_HOME/models/<id>`` (installed) and the fine-tune's job directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.models.registry import DEPLOYED, ModelSpec
from vbatch_pipelines.paths import UnsafePath, inside
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import DEFAULT_OWNER, Model, Owner

if TYPE_CHECKING:
    from vbatch_pipelines.models.install import InstallPolicy


def get_model(db: Database, model_id: str) -> Model | None:
    return db.get(Model, model_id)


def upsert_model(db: Database, model_id: str, **fields: Any) -> Model:
    stamp = int(time.time())
    with db.session() as session:
        row = session.get(Model, model_id, with_for_update=True)
        if row is None:
            row = Model(id=model_id, created_at=stamp, updated_at=stamp, **fields)
            session.add(row)
        else:
            for key, value in fields.items():
                setattr(row, key, value)
            row.updated_at = stamp
    return row


def register_fine_tune(db: Database, spec: ModelSpec, job_id: str, owner: Owner = DEFAULT_OWNER) -> Model:
    """Serve the fine-tune by name from now on (the engine has loaded its adapter), to its job's project."""
    return upsert_model(db, spec.id, kind="fine_tune", parent=spec.parent, path=spec.adapter, status=DEPLOYED,
                        source=job_id, **owner.columns())


def fine_tunes_of(db: Database, base: str) -> list[Model]:
    with db.session() as session:
        return list(session.scalars(select(Model).where(Model.kind == "fine_tune", Model.parent == base)))


class ModelStoreError(VbatchError):
    """A model that is not the store's to remove."""

    code = "model_not_deletable"

    def __init__(self, message: str):
        super().__init__(message, "model")


def remove_model(db: Database, model_registry, inference_engine, model_id: str,
                 project_id: str | None = None) -> Model:
    """Take a model out of service. A fine-tune: its adapter is unloaded from the running engine (the files
    stay; its job can deploy it again). An installed base model: its server stops and its files are deleted.
    Models configured by VBATCH_MODELS are not the store's to remove."""
    from vbatch_pipelines.models.registry import DEPLOYED, READY, ModelNotFound

    if model_id in model_registry.configured_models():
        raise ModelStoreError(f"{model_id} is configured by VBATCH_MODELS (or is the built-in default); "
                              "change that setting to remove it")
    row = get_model(db, model_id)
    # another project's fine-tune is as good as missing (a shared one too: only its own project removes it)
    if row is None or row.status not in (READY, DEPLOYED) or \
            (project_id is not None and row.project_id not in (None, project_id)):
        raise ModelNotFound(model_id, [])
    spec = model_registry.lookup(model_id)
    if row.kind == "fine_tune":
        from vbatch_pipelines.store.models import FineTuningJob

        inference_engine.undeploy_adapter(spec)
        with db.session() as session:  # the job that made it says it is no longer served
            job = session.get(FineTuningJob, row.source) if row.source else None
            if job is not None:
                job.deployment = {"status": "undeployed", "reason": "deleted through /v1/models",
                                  "at": int(time.time())}
        return upsert_model(db, model_id, status="undeployed")
    for tune in fine_tunes_of(db, model_id):
        if tune.status == DEPLOYED:
            upsert_model(db, tune.id, status="undeployed")
    if inference_engine.resolved_backend() == "vllm":
        inference_engine.server(spec).stop()
    if owns_files(row, model_registry.models_dir):
        import shutil

        shutil.rmtree(row.path, ignore_errors=True)
    return upsert_model(db, model_id, status="deleted")


def owns_files(row: Model, models_dir: Path) -> bool:
    """Whether deleting the model deletes its files: only what vbatch downloaded into its own directory
    (``models/<id>``), never a directory it was installed from (an alias of another model included)."""
    if (row.details or {}).get("source_kind") == "local":
        return False
    try:
        return Path(row.path).resolve() == inside(models_dir, *row.id.split("/"))
    except UnsafePath:
        return False


def request_install(db: Database, model_registry, inference_engine, source: str, *, model_id: str | None = None,
                    revision: str | None = None, trust_remote_code: bool = False,
                    policy: InstallPolicy | None = None) -> Model:
    """Check an install before anything big moves (the policy: where local sources may be, remote code;
    then config.json only: remote code, fit on the engine's device) and record it as ``installing``;
    installed_model downloads and smoke-tests it. ``policy`` defaults to the server's (the model registry's).
    Raises InstallError with the reason."""
    from vbatch_pipelines.models.install import (
        MODEL_ID,
        InstallError,
        available_memory,
        check_remote_code,
        cpu_kv_cache_reservation,
        fit_check,
        resolve,
    )
    local = (policy or model_registry.install_policy()).check(source, trust_remote_code)
    if model_id is None:
        model_id = local.name if local is not None else source
    if not MODEL_ID.match(model_id):
        raise InstallError(f"{model_id!r} is not a usable model id: a name or owner/name of letters, digits, '.', "
                           "'-' and '_', each part starting with a letter or digit", "invalid_model_id")
    existing = get_model(db, model_id)
    if model_id in model_registry.configured_models() or (existing is not None and existing.status in ("ready", "installing")):
        raise InstallError(f"A model named {model_id} is already {'configured' if existing is None else existing.status}; "
                           "choose another id or delete it first", "model_exists")
    resolved = resolve(source, revision)
    check_remote_code(resolved.config, trust_remote_code, source)
    gpus = inference_engine.gpus
    available, device = available_memory(gpus, inference_engine.gpu_memory_utilization or 1.0)
    report = fit_check(resolved.config, gpus=gpus, context=inference_engine.max_model_len, available=available,
                       device=device, weight_bytes=resolved.weight_bytes,
                       kv_reservation=None if gpus else cpu_kv_cache_reservation(
                           resolved.config, inference_engine.max_model_len, inference_engine.kv_cache_sequences))
    if not report.fits:
        raise InstallError(f"{source} does not fit: it {report.describe()}. Suggestion: {report.suggestion}",
                           "model_does_not_fit")
    return upsert_model(db, model_id, kind="base", parent=None, status="installing", source=source,
                        path=resolved.location if resolved.kind == "local"
                        else str(inside(model_registry.models_dir, *model_id.split("/"))),
                        revision=resolved.revision, trust_remote_code=trust_remote_code, bytes=None,
                        details={"fit": report.as_dict(), "source_kind": resolved.kind})


def installs_without_run(db: Database, older_than_s: int) -> list[Model]:
    """Installs recorded while Dagster was unreachable (no run id in their details yet)."""
    cutoff = int(time.time()) - older_than_s
    with db.session() as session:
        rows = session.scalars(select(Model).where(Model.kind == "base", Model.status == "installing",
                                                   Model.updated_at <= cutoff))
        return [row for row in rows if not (row.details or {}).get("dagster_run_id")]
