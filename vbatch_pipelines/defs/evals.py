"""Fixed evaluation sets: every (set, model) is a partition of ``eval_score``: the model asked the set's frozen
questions as a batch, scored against the gold answers (and by the LLM judge when one is configured); the sensor
launches the runs the API recorded."""

from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    DefaultSensorStatus,
    Definitions,
    Failure,
    MaterializeResult,
    MetadataValue,
    MultiPartitionKey,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    asset,
    define_asset_job,
    in_process_executor,
    sensor,
)

from resources import FileStore, InferenceEngine, MetadataDB, ModelRegistry, RetrainingPolicy
from vbatch_pipelines import evals
from vbatch_pipelines.batch.execute import run_lines
from vbatch_pipelines.dagster_ext.pools import gpu_to_itself
from vbatch_pipelines.defs.fine_tuning import deployed_model
from vbatch_pipelines.defs.gpu import gpu_run_tags
from vbatch_pipelines.defs.models import installed_model
from vbatch_pipelines.defs.runs import LAUNCH_GRACE_S, without_run
from vbatch_pipelines.fine_tuning import comparison as compare
from vbatch_pipelines.names import EVAL_RUN_TAG, EVAL_SCORE_JOB, eval_run_tags
from vbatch_pipelines.partitions import eval_model_partitions, eval_partitions, eval_set_partitions
from vbatch_pipelines.store.models import EvalRun, Owner


def score_model(db, file_store, inference_engine, model_registry, judge_model: str | None, record, spec, *,
                log, run_id: str | None, name: str) -> tuple[dict, list, dict]:
    """Ask ``spec`` the set's questions as a batch and score its answers (the judge compares each with the gold
    answer, both orders); returns scores, sample rows and the batches. (A retrain's comparison on a fixed set asks
    both models in ``model_comparison``, whose judge weighs one model against the other.)"""
    items = evals.eval_set_items(record)
    owner = Owner.of(record)
    batches = {}
    batches["answers"], answers = run_lines(db, file_store, inference_engine, f"{name}-answers",
                                            compare.request_lines(items, spec.id, compare.answer_budget(items)), spec,
                                            metadata={"eval": record.id, "eval_model": spec.id}, log=log,
                                            run_id=run_id, owner=owner)
    scores, rows = evals.score_answers(items, answers)
    if judge_model:
        judge = model_registry.resolve(judge_model)
        gold = {item["custom_id"]: item["gold"] for item in items}
        batches["judge"], verdicts = run_lines(db, file_store, inference_engine, f"{name}-judge",
                                               compare.judge_lines(items, gold, answers, judge.id), judge,
                                               metadata={"eval": record.id, "eval_model": spec.id, "judge": "1"},
                                               log=log, run_id=run_id, owner=owner)
        scores["judge_win_rate"], scores["judge_verdicts"] = compare.judge_win_rate(verdicts)
    return scores, rows, batches


@asset(partitions_def=eval_partitions, group_name="models", kinds={"vllm"}, pool="gpu",
       deps=[AssetDep(installed_model, partition_mapping=AllPartitionMapping()),
             AssetDep(deployed_model, partition_mapping=AllPartitionMapping())])
def eval_score(context: AssetExecutionContext, metadata_db: MetadataDB, file_store: FileStore,
               model_registry: ModelRegistry, inference_engine: InferenceEngine,
               retraining_policy: RetrainingPolicy) -> MaterializeResult:
    """A model (base or fine-tune) on a fixed evaluation set: exact and normalised match against the frozen gold
    answers, answer length, the judge's win rate against gold when a judge is configured."""
    db = metadata_db.db
    keys = context.partition_key.keys_by_dimension
    eval_id, model = keys["eval_set"], keys["model"]
    try:
        record = evals.get_eval_set(db, eval_id)
    except evals.EvalNotFound as exc:
        raise Failure(str(exc)) from exc
    run_id = context.run.tags.get(EVAL_RUN_TAG)
    if run_id is None or db.get(EvalRun, run_id) is None:  # materialized from Dagster itself (the rerun button)
        run_id = evals.record_run(db, record, model, Owner(record.project_id, f"run {context.run_id}")).id
    evals.update_run(db, run_id, status="in_progress", dagster_run_id=context.run_id)
    try:
        spec = model_registry.lookup(model, project=record.project_id)
        with gpu_to_itself(context):
            scores, rows, batches = score_model(
                db, file_store, inference_engine, model_registry, retraining_policy.judge_model, record,
                model_registry.prepare(spec), log=context.log.info, run_id=context.run_id, name=run_id)
    except Exception as exc:
        evals.update_run(db, run_id, status="failed", finished_at=evals.now(),
                         error={"code": "eval_failed", "message": str(exc)[:4000]})
        raise
    evals.update_run(db, run_id, status="completed", finished_at=evals.now(), scores=scores, rows=rows,
                     batches=batches)
    context.log.info(f"{model} on {record.name} ({eval_id}): normalized match {scores['normalized_match']}")
    return MaterializeResult(metadata={
        "eval_id": eval_id, "eval_name": record.name, "model": model, "eval_run": run_id,
        "fingerprint": record.fingerprint,
        **{k: v for k, v in scores.items() if isinstance(v, (int, float)) and v is not None},
        "batches": MetadataValue.json(batches),
        "sample": MetadataValue.md(_sample(rows)),
    })


def _sample(rows: list[dict]) -> str:
    from vbatch_pipelines.curation.dataset import markdown_table

    return markdown_table(["prompt", "gold", "answer", "match"],
                          [[r["prompt"], r["gold"], r["answer"], "✅" if r["match"] else ""] for r in rows])


def build_eval_score_job(run_gpus: int):
    """Scoring in one run (in-process executor): on Kubernetes its pod asks for ``run_gpus`` GPUs."""
    return define_asset_job(EVAL_SCORE_JOB, selection=[eval_score], partitions_def=eval_partitions,
                            executor_def=in_process_executor, tags=gpu_run_tags(run_gpus),
                            description="Score one model on one fixed evaluation set.")


@sensor(job_name=EVAL_SCORE_JOB, minimum_interval_seconds=5, default_status=DefaultSensorStatus.RUNNING)
def eval_score_sensor(context: SensorEvaluationContext, metadata_db: MetadataDB):
    """Eval runs recorded without a Dagster run get one (run_key = the eval run's id: at most one)."""
    queued = {run.id: run for run in evals.queued_runs(metadata_db.db, older_than_s=LAUNCH_GRACE_S)}
    launch = without_run(context.instance, EVAL_RUN_TAG, list(queued))
    if not launch:
        return SkipReason("No eval run waiting for a Dagster run")
    runs = [queued[i] for i in launch]
    return SensorResult(
        run_requests=[RunRequest(run_key=run.id, partition_key=MultiPartitionKey({"eval_set": run.eval_id,
                                                                                "model": run.model}),
                                 tags=eval_run_tags(run.id, run.eval_id, run.model)) for run in runs],
        dynamic_partitions_requests=[eval_set_partitions.build_add_request(sorted({r.eval_id for r in runs})),
                                     eval_model_partitions.build_add_request(sorted({r.model for r in runs}))],
    )


def build_defs(run_gpus: int = 0) -> Definitions:
    return Definitions(assets=[eval_score], jobs=[build_eval_score_job(run_gpus)], sensors=[eval_score_sensor])
