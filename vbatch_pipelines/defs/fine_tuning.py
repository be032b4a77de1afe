"""Fine-tuning, one partition per fine-tuning job: the trained LoRA checkpoint, its comparison with the base
model on held-out gold stars, and its deployment into the warm engine; the job that runs the three, and the
sensor that launches recorded jobs and fails those whose run died."""

import time
from contextlib import contextmanager

from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetObservation,
    AssetSelection,
    DagsterRunStatus,
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

from resources import (
    FileStore,
    InferenceEngine,
    MetadataDB,
    ModelRegistry,
    RetrainingPolicy,
)
from resources.trainer import Trainer, TrainingCancelled
from vbatch_pipelines import evals
from vbatch_pipelines.batch.execute import run_lines
from vbatch_pipelines.dagster_ext.pools import gpu_to_itself
from vbatch_pipelines.defs.curation import gold_star_dataset, preference_dataset
from vbatch_pipelines.defs.gpu import gpu_run_tags
from vbatch_pipelines.defs.models import installed_model
from vbatch_pipelines.defs.runs import ACTIVE_RUN, LAUNCH_GRACE_S, without_run
from vbatch_pipelines.files import register_file
from vbatch_pipelines.fine_tuning import comparison as compare
from vbatch_pipelines.fine_tuning.report import (
    loss_curve_svg,
    loss_markdown,
    results_csv,
)
from vbatch_pipelines.fine_tuning.service import (
    INITIAL_ADAPTER,
    add_checkpoint,
    add_event,
    add_events,
    clear_checkpoints,
    deploy_fine_tune,
    fail_job,
    fine_tuned_model_name,
    get_job,
    jobs_without_run,
    now,
    unfinished_jobs_with_run,
    update_job,
)
from vbatch_pipelines.names import (
    FINE_TUNING_JOB,
    FINE_TUNING_JOB_TAG,
    fine_tuning_run_tags,
)
from vbatch_pipelines.partitions import fine_tune_partitions
from vbatch_pipelines.paths import write_atomic
from vbatch_pipelines.store.models import Owner

PROGRESS_EVERY_S = 10.0  # training progress appears in the asset's metadata (observations) this often


def step_data(metrics: dict) -> dict:
    """A trainer metrics message as a job event's data (OpenAI's names): step, loss, learning rate, epoch."""
    return {"step": metrics["step"], "total_steps": metrics["total_steps"], "train_loss": metrics["loss"],
            "learning_rate": metrics["learning_rate"], "epoch": metrics["epoch"]}


def progress_metadata(metrics: dict) -> dict:
    """The same, plus the ETA, as metadata the UI plots while training runs."""
    progress = step_data(metrics)
    if metrics.get("eta_seconds") is not None:
        progress["eta_seconds"] = metrics["eta_seconds"]
    return progress


def _job_or_fail(db, job_id: str):
    job = get_job(db, job_id)
    if job is None:
        raise Failure(f"Fine-tuning job {job_id} is not in the metadata DB; create it with the API or the CLI")
    if job.status == "cancelled":
        raise Failure(f"Fine-tuning job {job_id} was cancelled")
    if job.status == "failed":
        raise Failure(f"Fine-tuning job {job_id} has failed ({(job.error or {}).get('message')}); create a new job")
    return job


@contextmanager
def _failing_job(db, job_id: str, code: str):
    """Whatever goes wrong ends the job as ``failed`` with the reason (a cancel stays ``cancelled``)."""
    try:
        yield
    except TrainingCancelled as exc:
        raise Failure(f"Fine-tuning job {job_id} was cancelled") from exc
    except Exception as exc:
        fail_job(db, job_id, code, str(exc))
        raise


# A fine-tune trains on one base model; Dagster has no key-to-key mapping between two dynamic partition sets,
# so the lineage edge from installed_model spans all its partitions.
@asset(partitions_def=fine_tune_partitions, pool="gpu", group_name="models", kinds={"pytorch"},
       deps=[gold_star_dataset, preference_dataset,
             AssetDep(installed_model, partition_mapping=AllPartitionMapping())])
def fine_tuned_checkpoint(context: AssetExecutionContext, metadata_db: MetadataDB, file_store: FileStore,
                          model_registry: ModelRegistry, trainer: Trainer,
                          inference_engine: InferenceEngine) -> MaterializeResult:
    """A LoRA adapter trained on the job's examples (a dataset version or an uploaded file): supervised on gold
    stars, or DPO on preference pairs (then with the held-out preference accuracy before and after); eval loss and
    a loss curve. The trainer runs out of process through Dagster Pipes."""
    job_id = context.partition_key
    db = metadata_db.db
    job = _job_or_fail(db, job_id)
    with _failing_job(db, job_id, "training_failed"):
        base = model_registry.resolve(job.model)
        update_job(db, job_id, status="running", started_at=job.started_at or now(), dagster_run_id=context.run_id)
        clear_checkpoints(db, job_id)
        add_event(db, job_id, f"Fine-tuning job started ({job.method_type} with {trainer.resolved_backend()} on "
                              f"{'GPU' if trainer.gpus else 'CPU'})")
        directory = file_store.fine_tune_dir(job_id)
        data = directory / "data"
        params = {"base_model": base.path, "train_file": str(data / "train.jsonl"),
                  "eval_file": str(data / "eval.jsonl") if (data / "eval.jsonl").exists() else None,
                  "output_dir": str(directory / "output"), "hyperparameters": job.hyperparameters, "seed": job.seed,
                  "method": job.method_type,
                  "initial_adapter": str(data / INITIAL_ADAPTER) if job.starting_model else None}
        steps: list[dict] = []
        observed_at = float("-inf")  # when progress was last recorded as an observation

        def on_messages(messages: list[dict]) -> None:
            nonlocal observed_at
            metrics = [m for m in messages if m["type"] == "metrics"]
            steps.extend(metrics)
            add_events(db, job_id, [
                {"message": f"Step {m['step']}/{m['total_steps']}: training loss={m['loss']:.4f}", "type": "metrics",
                 "data": step_data(m)} for m in metrics])
            if metrics and metrics[-1].get("eta_seconds") is not None:
                update_job(db, job_id, estimated_finish=int(time.time() + metrics[-1]["eta_seconds"]))
            if metrics and (time.monotonic() - observed_at >= PROGRESS_EVERY_S
                            or metrics[-1]["step"] == metrics[-1]["total_steps"]):
                observed_at = time.monotonic()
                context.log_event(AssetObservation(asset_key=context.asset_key, partition=job_id,
                                                   metadata=progress_metadata(metrics[-1])))
            for m in messages:
                if m["type"] == "checkpoint":
                    add_checkpoint(db, job, m["step"], m["path"], m["metrics"])
                    add_event(db, job_id, f"Checkpoint created at step {m['step']}")

        def cancelled() -> bool:
            current = get_job(db, job_id)
            return current is None or current.status == "cancelled"

        with gpu_to_itself(context), inference_engine.released_for_training(log=context.log.info):
            result = trainer.train(context, params, directory / "train.log", on_messages=on_messages,
                                   should_stop=cancelled)
        svg = loss_curve_svg(steps, result["eval_loss"])
        write_atomic(directory / "loss_curve.svg", svg)
        write_atomic(directory / "results.csv", results_csv(steps))
        results_file = register_file(db, directory / "results.csv", f"{job_id}_results.csv", "fine-tune-results",
                                     owner=Owner.of(job))
        metrics = {**(job.metrics or {}), **{k: result[k] for k in (
            "train_loss", "eval_loss", "steps", "backend", "device", "train_seconds", "train_examples",
            "eval_examples")}, "adapter_dir": result["adapter_dir"], "merged_dir": result["merged_dir"],
            **({"preference_accuracy": result["preference_accuracy"]} if result.get("preference_accuracy") else {})}
        update_job(db, job_id, metrics=metrics, trained_tokens=result["trained_tokens"],
                   result_files=[results_file.id], estimated_finish=None)
        accuracy = result.get("preference_accuracy") or {}
        add_event(db, job_id, f"Training finished: {result['steps']} steps, train loss {result['train_loss']:.4f}"
                              + (f", eval loss {result['eval_loss']:.4f}" if result["eval_loss"] is not None else "")
                              + (f", held-out preference accuracy {accuracy['base']} → {accuracy['fine_tuned']}"
                                 if accuracy.get("fine_tuned") is not None else ""))
    return MaterializeResult(metadata={
        "base_model": job.model,
        "dataset_version": job.dataset_version or "",
        "training_file": job.training_file,
        "backend": result["backend"], "device": result["device"],
        "steps": result["steps"], "train_loss": result["train_loss"],
        "eval_loss": result["eval_loss"] if result["eval_loss"] is not None else float("nan"),
        "trained_tokens": result["trained_tokens"], "train_seconds": result["train_seconds"],
        "method": job.method_type, "starting_model": job.starting_model or job.model,
        **({"preference_accuracy_before": accuracy["base"], "preference_accuracy_after": accuracy["fine_tuned"]}
           if accuracy.get("fine_tuned") is not None else {}),
        "hyperparameters": MetadataValue.json(job.hyperparameters),
        "adapter": MetadataValue.path(result["adapter_dir"]),
        "loss_curve": MetadataValue.md(loss_markdown(steps, result["eval_loss"])),
        "loss_curve_path": MetadataValue.path(str(directory / "loss_curve.svg")),
    })


def fixed_eval_set(db, retraining_policy, job):
    """The fixed eval set a retrain (scheduled or automated, not an API job) is compared on, when one is set."""
    if not retraining_policy.eval_set or job.trigger == "api":
        return None
    return evals.get_eval_set(db, retraining_policy.eval_set, job.project_id)


def starting_spec(model_registry, file_store, job):
    """What a job's fine-tune is compared with: its base model, or the fine-tune a DPO job continued (as served,
    or from the job's own copy of its adapter when it is no longer registered)."""
    from vbatch_pipelines.models.registry import ModelNotFound

    base = model_registry.resolve(job.model)
    if not job.starting_model:
        return base
    try:
        return model_registry.lookup(job.starting_model, project=job.project_id)
    except ModelNotFound:
        return base.with_adapter(job.starting_model, str(file_store.fine_tune_dir(job.id) / "data" / INITIAL_ADAPTER))


@asset(partitions_def=fine_tune_partitions, deps=[fine_tuned_checkpoint], group_name="models",
       kinds={"vllm"}, pool="gpu")
def model_comparison(context: AssetExecutionContext, metadata_db: MetadataDB, file_store: FileStore,
                     model_registry: ModelRegistry, inference_engine: InferenceEngine,
                     retraining_policy: RetrainingPolicy) -> MaterializeResult:
    """The model the job started from (its base, or the fine-tune a DPO job continued) and the fine-tune on the
    job's held-out examples, each run as a batch: exact and normalised match against gold (a pair's chosen answer),
    answer length, how far answers moved from rejected ones, and an LLM judge's win rate when one is configured."""
    job_id = context.partition_key
    db = metadata_db.db
    job = _job_or_fail(db, job_id)
    judge_model = retraining_policy.judge_model
    with gpu_to_itself(context), _failing_job(db, job_id, "comparison_failed"):
        fixed = fixed_eval_set(db, retraining_policy, job)
        eval_path = file_store.fine_tune_dir(job_id) / "data" / "eval.jsonl"
        if fixed is not None:  # a retrain compared on the same questions as every retrain before it
            items = evals.eval_set_items(fixed)
            context.log.info(f"Comparing on the fixed eval set {fixed.name} ({fixed.id}, {len(items)} items)")
        else:
            items = compare.eval_items(eval_path) if eval_path.exists() else []
        if not items:
            update_job(db, job_id, comparison={"examples": 0, "base": {}, "fine_tuned": {}, "rows": []})
            add_event(db, job_id, "No held-out eval examples: comparison skipped")
            return MaterializeResult(metadata={"examples": 0, "skipped": "no held-out eval examples"})
        base = starting_spec(model_registry, file_store, job)
        name = fine_tuned_model_name(job.model, job.suffix, job_id)
        tuned = base.with_adapter(name, (job.metrics or {})["adapter_dir"])
        max_tokens = compare.answer_budget(items)
        answers, batches = {}, {}
        for label, spec in (("base", base), ("fine_tuned", tuned)):
            batches[label], answers[label] = run_lines(
                db, file_store, inference_engine, f"{job_id}-compare-{label}",
                compare.request_lines(items, spec.id, max_tokens), spec,
                metadata={"fine_tuning_job": job_id, "comparison": label}, log=context.log.info,
                run_id=context.run_id, owner=Owner.of(job))
        summary = {"examples": len(items), "judge_model": judge_model, "eval_set": fixed.id if fixed else None,
                   "base_model": base.id, "fine_tuned_model": name, "batches": batches,
                   "base": compare.score(items, answers["base"]),
                   "fine_tuned": compare.score(items, answers["fine_tuned"]),
                   "rows": compare.side_by_side(items, answers["base"], answers["fine_tuned"])}
        if judge_model:
            judge = model_registry.resolve(judge_model)
            batches["judge"], verdicts = run_lines(
                db, file_store, inference_engine, f"{job_id}-compare-judge",
                compare.judge_lines(items, answers["base"], answers["fine_tuned"], judge.id), judge,
                metadata={"fine_tuning_job": job_id, "comparison": "judge"}, log=context.log.info,
                run_id=context.run_id, owner=Owner.of(job))
            rate, counts = compare.judge_win_rate(verdicts)
            summary["fine_tuned"]["judge_win_rate"] = rate
            summary["base"]["judge_win_rate"] = None if rate is None else round(1 - rate, 4)
            summary["judge_verdicts"] = counts
        accuracy = (job.metrics or {}).get("preference_accuracy") or {}
        if accuracy.get("fine_tuned") is not None:
            summary["base"]["preference_accuracy"] = accuracy["base"]
            summary["fine_tuned"]["preference_accuracy"] = accuracy["fine_tuned"]
        update_job(db, job_id, comparison=summary)
        if fixed is not None:  # both models' scores on the set join its leaderboard; the judge's verdicts here are
            # one model against the other, not against gold (eval_score's), so they stay out of it
            for label, model in (("base", base.id), ("fine_tuned", name)):
                run = evals.record_run(db, fixed, model, Owner.of(job))
                scores = {k: v for k, v in summary[label].items() if k != "judge_win_rate"}
                evals.update_run(db, run.id, status="completed", finished_at=now(), dagster_run_id=context.run_id,
                                 scores={"examples": len(items), **scores}, batches={"answers": batches[label]})
        add_event(db, job_id, "Compared with the base model on {n} held-out examples: normalized match "
                              "{b} → {t}".format(n=len(items), b=summary["base"]["normalized_match"],
                                                 t=summary["fine_tuned"]["normalized_match"]),
                  data={"base": summary["base"], "fine_tuned": summary["fine_tuned"]})
    return MaterializeResult(metadata={
        "examples": len(items),
        **{f"base_{k}": v for k, v in summary["base"].items() if v is not None},
        **{f"fine_tuned_{k}": v for k, v in summary["fine_tuned"].items() if v is not None},
        "batches": MetadataValue.json(batches),
        "table": MetadataValue.md(compare.markdown(summary)),
    })


@asset(partitions_def=fine_tune_partitions, deps=[model_comparison], group_name="models", kinds={"vllm"})
def deployed_model(context: AssetExecutionContext, metadata_db: MetadataDB, model_registry: ModelRegistry,
                   inference_engine: InferenceEngine, retraining_policy: RetrainingPolicy) -> MaterializeResult:
    """The fine-tune served by the warm engine as a LoRA adapter on its base model (no restart), listed in
    /v1/models with its base as parent, when the job's deploy policy allows it."""
    job_id = context.partition_key
    db = metadata_db.db
    job = _job_or_fail(db, job_id)
    name = fine_tuned_model_name(job.model, job.suffix, job_id)
    with _failing_job(db, job_id, "deployment_failed"):
        deploy, reason = compare.gate(job.comparison, job.deploy, retraining_policy.gate_metric)
        adapter = (job.metrics or {})["adapter_dir"]
        latency = None
        if deploy:
            latency = deploy_fine_tune(db, model_registry, inference_engine, job, reason)
        else:
            # The comparison loaded it as a candidate; it does not stay in the engine. The job says so (it
            # succeeded, its model is not served) and POST /v1/fine_tuning/jobs/{id}/deploy serves it later.
            base = model_registry.lookup(job.model)
            inference_engine.undeploy_adapter(base.with_adapter(name, adapter))
            update_job(db, job_id, fine_tuned_model=name,
                       deployment={"status": "rejected", "reason": reason, "at": now()})
            add_event(db, job_id, f"Fine-tuned model {name} not deployed: {reason}; deploy it explicitly with "
                                  f"POST /v1/fine_tuning/jobs/{job_id}/deploy", level="warn")
        update_job(db, job_id, status="succeeded", finished_at=now())
        add_event(db, job_id, "The job has successfully completed")
    return MaterializeResult(metadata={
        "model": name, "base_model": job.model, "deployed": deploy, "reason": reason,
        "deployment_status": "deployed" if deploy else "rejected",
        "adapter": MetadataValue.path(adapter), "engine": inference_engine.resolved_backend(),
        **({"load_seconds": latency} if latency is not None else {}),
    })


def build_fine_tuning_job(run_gpus: int):
    """The three assets in one run (in-process executor): on Kubernetes its pod asks for ``run_gpus`` GPUs."""
    return define_asset_job(
        FINE_TUNING_JOB,
        selection=AssetSelection.assets(fine_tuned_checkpoint, model_comparison, deployed_model),
        partitions_def=fine_tune_partitions,
        executor_def=in_process_executor,
        tags=gpu_run_tags(run_gpus),
        description="Train a LoRA adapter, compare it with its base model, deploy it into the warm engine.",
    )


@sensor(job_name=FINE_TUNING_JOB, minimum_interval_seconds=5, default_status=DefaultSensorStatus.RUNNING)
def fine_tuning_sensor(context: SensorEvaluationContext, metadata_db: MetadataDB):
    """Fine-tuning jobs recorded without a run get one (run_key = job id: at most one, also for the jobs
    the retraining schedule and automation record); a job whose run ended without finishing it (the run
    crashed or was terminated in Dagster) is marked failed, so no job stays ``running`` forever."""
    db = metadata_db.db
    ended = []
    for job in unfinished_jobs_with_run(db):
        run = context.instance.get_run_by_id(job.dagster_run_id)
        if run is None or (run.status not in ACTIVE_RUN and run.status != DagsterRunStatus.SUCCESS):
            if fail_job(db, job.id, "run_ended", f"Its Dagster run {job.dagster_run_id} ended "
                                                  f"({run.status.value if run else 'missing'}) before the job finished"):
                ended.append(job.id)
    launch = without_run(context.instance, FINE_TUNING_JOB_TAG, jobs_without_run(db, older_than_s=LAUNCH_GRACE_S))
    if not launch:
        return SkipReason(f"No fine-tuning job waiting for a run; {len(ended)} ended with their run")
    return SensorResult(
        run_requests=[RunRequest(run_key=j, partition_key=j, tags=fine_tuning_run_tags(j)) for j in launch],
        dynamic_partitions_requests=[fine_tune_partitions.build_add_request(launch)],
    )


def build_defs(run_gpus: int = 0) -> Definitions:
    return Definitions(assets=[fine_tuned_checkpoint, model_comparison, deployed_model],
                       jobs=[build_fine_tuning_job(run_gpus)], sensors=[fine_tuning_sensor])
