"""The model store: one ``installed_model`` partition per installed base model, its job, and the sensor
that launches installs accepted while Dagster was unreachable."""

import asyncio
import time

from dagster import (
    AssetExecutionContext,
    AssetSelection,
    DefaultSensorStatus,
    Definitions,
    Failure,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    asset,
    define_asset_job,
    in_process_executor,
    sensor,
)

from resources import InferenceEngine, MetadataDB, ModelRegistry
from vbatch_pipelines.dagster_ext.pools import gpu_to_itself
from vbatch_pipelines.defs.gpu import gpu_run_tags
from vbatch_pipelines.defs.runs import LAUNCH_GRACE_S
from vbatch_pipelines.models.install import (
    InstallError,
    directory_bytes,
    download,
    resolve,
)
from vbatch_pipelines.models.registry import EMBED, READY, SCORE, ModelSpec, detect_task
from vbatch_pipelines.models.store import get_model, installs_without_run, upsert_model
from vbatch_pipelines.names import INSTALL_MODEL_JOB, install_run_tags
from vbatch_pipelines.partitions import model_partitions
from vbatch_pipelines.paths import inside

SMOKE_PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]


def smoke_test(inference_engine: InferenceEngine, spec: ModelSpec) -> tuple[float, str]:
    """One chat completion (an embedding for an embedding model, a score for a cross-encoder) on the engine
    that will serve the model: (seconds, answer)."""
    text = SMOKE_PROMPT[0]["content"]
    endpoint, body = {
        EMBED: ("/v1/embeddings", {"model": spec.id, "input": text}),
        SCORE: ("/v1/score", {"model": spec.id, "text_1": text, "text_2": "Hello."}),
    }.get(spec.task, ("/v1/chat/completions",
                      {"model": spec.id, "messages": SMOKE_PROMPT, "max_tokens": 16, "temperature": 0}))

    async def ask():
        engine = inference_engine.open(spec)
        try:
            started = time.monotonic()
            response = await engine.request(endpoint, body)
            return time.monotonic() - started, response
        finally:
            await engine.aclose()

    seconds, response = asyncio.run(ask())
    if not response.ok:
        raise InstallError(f"The smoke test failed: {response.body.get('error', response.body)}", "smoke_test_failed")
    if spec.task == EMBED:
        return seconds, f"a vector of {len(response.body['data'][0]['embedding'])} dimensions"
    if spec.task == SCORE:
        return seconds, f"a score of {response.body['data'][0]['score']:.4f}"
    return seconds, response.body["choices"][0]["message"]["content"]


@asset(partitions_def=model_partitions, group_name="models", kinds={"huggingface"}, pool="gpu")
def installed_model(context: AssetExecutionContext, metadata_db: MetadataDB, model_registry: ModelRegistry,
                    inference_engine: InferenceEngine) -> MaterializeResult:
    """A base model on local disk at a pinned revision, checked to fit, smoke-tested on the engine, then
    served. The install was checked and recorded by the API or CLI (request_install) before this runs."""
    model_id = context.partition_key
    db = metadata_db.db
    row = get_model(db, model_id)
    if row is None or row.kind != "base":
        raise Failure(f"No install of {model_id} was requested; use POST /v1/models or `vbatch models install`")
    try:
        source = resolve(row.source, row.revision)
        path = download(source, inside(model_registry.models_dir, *model_id.split("/")), None,
                        progress=context.log.info)
        spec = ModelSpec(model_id, str(path), trust_remote_code=row.trust_remote_code, task=detect_task(str(path)))
        with gpu_to_itself(context):
            latency, answer = smoke_test(inference_engine, spec)
    except Exception as exc:
        upsert_model(db, model_id, status="failed", details={**(row.details or {}), "error": str(exc)[:4000]})
        raise Failure(f"Installing {model_id} failed: {exc}") from exc
    size = directory_bytes(path)
    details = {**(row.details or {}), "smoke_test": {"seconds": round(latency, 3), "answer": answer}}
    upsert_model(db, model_id, status=READY, path=str(path), revision=source.revision, bytes=size, details=details)
    context.log.info(f"{model_id} installed ({size / 1e6:.1f} MB) and answered in {latency:.2f}s: {answer!r}")
    fit = details.get("fit", {})
    return MaterializeResult(metadata={
        "source": row.source, "revision": source.revision or "local", "path": MetadataValue.path(str(path)),
        "bytes": size, "parameters": fit.get("parameters", 0), "serving_dtype": fit.get("dtype", ""),
        "fit": MetadataValue.json(fit), "smoke_test_seconds": round(latency, 3), "smoke_test_answer": answer,
        "engine": inference_engine.resolved_backend(),
    })


def build_installed_model_job(run_gpus: int):
    """One install per run (in-process executor): on Kubernetes its pod asks for ``run_gpus`` GPUs, where
    the smoke test starts the model on the engine."""
    return define_asset_job(
        INSTALL_MODEL_JOB,
        selection=AssetSelection.assets(installed_model),
        partitions_def=model_partitions,
        executor_def=in_process_executor,
        tags=gpu_run_tags(run_gpus),
        description="Download a base model at a pinned revision, smoke-test it on the engine, serve it.",
    )


@sensor(job_name=INSTALL_MODEL_JOB, minimum_interval_seconds=5, default_status=DefaultSensorStatus.RUNNING)
def model_install_sensor(context: SensorEvaluationContext, metadata_db: MetadataDB):
    """Installs accepted while Dagster was unreachable get their run (run_key: model id and request time)."""
    waiting = installs_without_run(metadata_db.db, older_than_s=LAUNCH_GRACE_S)
    if not waiting:
        return SkipReason("No install waiting for a run")
    return SensorResult(
        run_requests=[RunRequest(run_key=f"install-{row.id}-{row.updated_at}", partition_key=row.id,
                                 tags=install_run_tags(row.id)) for row in waiting],
        dynamic_partitions_requests=[model_partitions.build_add_request([row.id for row in waiting])],
    )


def build_defs(run_gpus: int = 0) -> Definitions:
    return Definitions(assets=[installed_model], jobs=[build_installed_model_job(run_gpus)],
                       sensors=[model_install_sensor])
