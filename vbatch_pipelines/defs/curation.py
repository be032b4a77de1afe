"""Curation: batch results go to Label Studio as review tasks; reviews come back (sensor, webhook, API);
gold stars become a versioned dataset (five asset checks), edits and ratings a versioned preference dataset
(three)."""

import json

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetSelection,
    Backoff,
    Config,
    DefaultSensorStatus,
    Definitions,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    asset,
    asset_check,
    define_asset_job,
    in_process_executor,
    sensor,
)

from resources import FileStore, LabelStudio, MetadataDB
from resources.label_studio import LabelStudioUnavailable, iso
from vbatch_pipelines.batch.service import INPUT_FILE, get_batch, iter_requests
from vbatch_pipelines.curation import dataset as gold
from vbatch_pipelines.curation import preferences
from vbatch_pipelines.curation.filters import DatasetFilter
from vbatch_pipelines.curation.schemas import (
    chat_messages,
    prediction,
    schema_for_batch,
)
from vbatch_pipelines.curation.service import (
    add_tasks,
    known_custom_ids,
    latest_change,
    projects_with_new_reviews,
    set_task_ids,
)
from vbatch_pipelines.curation.sync import record_task
from vbatch_pipelines.defs.batches import batch_output, each_batch
from vbatch_pipelines.names import CURATION_SEQ_TAG, GOLD_STAR_DATASET_JOB, PROJECT_TAG
from vbatch_pipelines.partitions import batch_partitions
from vbatch_pipelines.protocol import calls_tools, response_text
from vbatch_pipelines.settings import is_off
from vbatch_pipelines.store.models import DEFAULT_PROJECT, Owner, Project

REVIEWABLE_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


@asset(
    partitions_def=batch_partitions,
    deps=[batch_output],
    group_name="curation",
    kinds={"labelstudio"},
    retry_policy=RetryPolicy(max_retries=3, delay=15, backoff=Backoff.EXPONENTIAL),
)
def curation_tasks(context: AssetExecutionContext, metadata_db: MetadataDB, file_store: FileStore,
                   label_studio: LabelStudio) -> MaterializeResult:
    """Every successful result of the batch as a review task in Label Studio (never twice)."""
    return each_batch(context, {key: _curation_tasks(context, metadata_db, file_store, label_studio, key)
                                for key in context.partition_keys})


def _curation_tasks(context: AssetExecutionContext, metadata_db: MetadataDB, file_store: FileStore,
                    label_studio: LabelStudio, batch_id: str) -> dict:
    db = metadata_db.db
    batch = get_batch(db, batch_id)
    if batch is None:
        raise ValueError(f"Batch {batch_id} is not in the metadata DB")
    if batch.endpoint not in REVIEWABLE_ENDPOINTS:  # vectors: there is no answer for an expert to review
        return {"skipped": f"{batch.endpoint} results have nothing to review", "tasks": 0}
    if not label_studio.enabled:
        return {"skipped": label_studio.disabled_reason, "tasks": 0}
    if is_off((batch.metadata_ or {}).get("curation", "on")):
        return {"skipped": "curation is off for this batch (metadata.curation)", "tasks": 0}
    if batch.status != "completed":  # a neighbour in its run was cancelled or expired: nothing to review
        return {"skipped": f"the batch is {batch.status}", "tasks": 0}
    directory = file_store.batch_dir(batch_id)
    output_path = directory / "output.jsonl"
    responses: dict[str, str] = {}
    tool_calls = 0  # answers that are tool calls: the review schemas correct text, so they are not imported
    if output_path.exists():
        with open(output_path) as f:
            for line in f:
                result = json.loads(line)
                if (result.get("response") or {}).get("status_code") != 200:
                    continue
                if calls_tools(result["response"]["body"]):
                    tool_calls += 1
                else:
                    responses[result["custom_id"]] = response_text(result["response"]["body"]) or ""
    if tool_calls:
        context.log.info(f"{batch_id}: {tool_calls} answers are tool calls; they are not imported for review")

    known = known_custom_ids(db, batch_id)
    # Recorded but not confirmed: a run died between the import and recording its ids. Ask Label
    # Studio which of them arrived, so nothing is imported twice.
    unconfirmed = {custom_id for custom_id, task_id in known.items() if task_id is None}
    pending_rows, by_schema = [], {}
    for custom_id, body in iter_requests(directory / INPUT_FILE, set(), batch.model or ""):
        if custom_id not in responses or (custom_id in known and custom_id not in unconfirmed):
            continue
        schema = schema_for_batch(batch.metadata_, body)
        row = {"batch_id": batch_id, "custom_id": custom_id, "schema": schema.name, "model": batch.model,
               "messages": chat_messages(body), "response": responses[custom_id], **Owner.of(batch).columns()}
        if custom_id not in known:
            pending_rows.append(row)
        by_schema.setdefault(schema.name, (schema, []))[1].append(row)
    add_tasks(db, pending_rows)

    imported = 0
    project = db.get(Project, batch.project_id)
    if by_schema:
        label_studio.ensure_running()
        # the batch's project's own organization: only its reviewers see these tasks
        label_studio = label_studio.for_project(batch.project_id, project.name if project else None)
    for schema, rows in by_schema.values():
        project_id = label_studio.project_for(schema)
        if project is not None and project.review_annotations > 1:  # Label Studio hands each task to N reviewers
            label_studio.set_annotations_per_task(project_id, project.review_annotations)
        if unconfirmed:
            present = label_studio.tasks_of_batch(project_id, batch_id)
            set_task_ids(db, batch_id, project_id, {c: t for c, t in present.items() if c in unconfirmed})
            rows = [row for row in rows if row["custom_id"] not in present]
        tasks = [{"data": {"custom_id": r["custom_id"], "batch_id": batch_id, "model": r["model"] or "",
                           "schema": schema.name, "messages": r["messages"], "response": r["response"],
                           **({schema.id_field: r["custom_id"]} if schema.id_field else {})},
                  "meta": {"vbatch_batch_id": batch_id, "vbatch_run_id": context.run_id},
                  "predictions": [prediction(r["response"])]} for r in rows]
        ids = label_studio.import_tasks(project_id, tasks)
        if len(ids) != len(tasks):
            raise RuntimeError(f"Label Studio returned {len(ids)} task ids for {len(tasks)} imported tasks")
        set_task_ids(db, batch_id, project_id, {r["custom_id"]: task_id for r, task_id in zip(rows, ids)})
        imported += len(ids)
        context.log.info(f"{batch_id}: {len(ids)} tasks imported into project {project_id} ({schema.name})")
    return {
        "tasks": len(known_custom_ids(db, batch_id)),
        "imported_now": imported,
        "schemas": ", ".join(sorted(by_schema)) or "none",
        "tool_call_answers_not_imported": tool_calls,
        "label_studio": MetadataValue.url(label_studio.url),
    }


class DatasetConfig(Config):
    project_id: str = DEFAULT_PROJECT  # whose reviews: each project has its own versions


class GoldStarDatasetConfig(DatasetConfig):
    dataset_filter: DatasetFilter | None = None  # only these gold stars (e.g. one schema); the version records it


@asset(group_name="curation", kinds={"parquet", "jsonl"}, deps=[curation_tasks])
def gold_star_dataset(context: AssetExecutionContext, config: GoldStarDatasetConfig, metadata_db: MetadataDB,
                      file_store: FileStore) -> MaterializeResult:
    """A new version of a project's gold-star examples (expert edits replace model answers), split train/eval; a
    filtered one (``dataset_filter``) when launched with one: the sensor builds whole versions only."""
    seq = latest_change(metadata_db.db, config.project_id)
    version = gold.build_dataset(metadata_db.db, file_store.datasets_dir, source_seq=seq, run_id=context.run_id,
                                 project_id=config.project_id, chosen=config.dataset_filter)
    context.log.info(f"gold-star dataset {version.version} of {config.project_id}: {version.examples} examples")
    return MaterializeResult(
        metadata={
            "version": version.version,
            "project_id": config.project_id,
            "examples": version.examples,
            "train_examples": version.train_examples,
            "eval_examples": version.eval_examples,
            "fingerprint": version.fingerprint,
            "filter": MetadataValue.json(version.filter or {}),
            "by_schema": MetadataValue.json(version.counts["by_schema"]),
            "by_model": MetadataValue.json(version.counts["by_model"]),
            "path": MetadataValue.path(version.path),
            "preview": MetadataValue.md(gold.preview(version)),
        },
    )


@asset(group_name="curation", kinds={"parquet", "jsonl"}, deps=[curation_tasks])
def preference_dataset(context: AssetExecutionContext, config: DatasetConfig, metadata_db: MetadataDB,
                       file_store: FileStore) -> MaterializeResult:
    """A new version of a project's preference pairs (expert edit over model answer; better-rated over worse) for
    DPO, when they changed since the last version."""
    seq = latest_change(metadata_db.db, config.project_id)
    version, new = preferences.build_preference_dataset(metadata_db.db, file_store.datasets_dir, source_seq=seq,
                                                        run_id=context.run_id, project_id=config.project_id)
    if version is None:
        context.log.info(f"no preference pairs in {config.project_id} yet: no version")
        return MaterializeResult(metadata={"version": "none", "project_id": config.project_id, "pairs": 0})
    context.log.info(f"preference dataset {version.version} of {config.project_id}: {version.examples} pairs"
                     + ("" if new else " (unchanged: no new version)"))
    return MaterializeResult(metadata={
        "version": version.version, "new_version": new, "project_id": config.project_id, "pairs": version.examples,
        "train_pairs": version.train_examples, "eval_pairs": version.eval_examples,
        "fingerprint": version.fingerprint, "by_source": MetadataValue.json(version.counts["by_source"]),
        "by_schema": MetadataValue.json(version.counts["by_schema"]), "path": MetadataValue.path(version.path),
        "preview": MetadataValue.md(preferences.preview(version)),
    })


def _check(context: AssetCheckExecutionContext, metadata_db: MetadataDB, check: str, checker) -> AssetCheckResult:
    """Check the files of the version this run built (the latest when the check is run on its own)."""
    version, problems = checker(metadata_db.db, context.op_execution_context.run_id, check)
    return AssetCheckResult(passed=not problems, severity=AssetCheckSeverity.ERROR,
                            metadata={"version": version or "none", "problems": MetadataValue.json(problems[:20]),
                                      "count": len(problems)})


def _dataset_check(name: str, check: str, description: str, asset, checker):
    @asset_check(asset=asset, name=name, description=description)
    def _run(context: AssetCheckExecutionContext, metadata_db: MetadataDB) -> AssetCheckResult:
        return _check(context, metadata_db, check, checker)

    return _run


# (asset, check name, what the checker looks for, what it promises)
CHECK_TABLE = [
    (gold_star_dataset, "no_empty_responses", "empty_responses", "Every example has a non-empty final answer."),
    (gold_star_dataset, "no_duplicate_prompts", "duplicate_prompts",
     "No prompt appears twice across the exported splits."),
    (gold_star_dataset, "valid_chat_structure", "chat_structure",
     "Every line is an example whose messages alternate user/assistant after optional system, ending with the "
     "assistant."),
    (gold_star_dataset, "train_eval_disjoint", "split_leak", "No prompt is in both the train and the eval export."),
    (gold_star_dataset, "valid_answers", "valid_answers",
     "Every answer is valid for its task schema (JSON for json_extraction)."),
    (preference_dataset, "no_identical_pairs", "identical_pairs",
     "No pair's preferred and non-preferred answers are the same beyond whitespace."),
    (preference_dataset, "valid_pair_structure", "pair_structure",
     "Every line is a pair in OpenAI's preference format: input.messages ending with the user, one assistant "
     "answer on each side."),
    (preference_dataset, "pairs_train_eval_disjoint", "split_leak",
     "No prompt is in both the train and the eval export."),
]
DATASET_CHECKS = [
    _dataset_check(name, check, description, asset,
                   preferences.check_preference_dataset if asset is preference_dataset else gold.check_dataset)
    for asset, name, check, description in CHECK_TABLE]


gold_star_dataset_job = define_asset_job(
    GOLD_STAR_DATASET_JOB,
    selection=AssetSelection.assets(gold_star_dataset, preference_dataset),
    executor_def=in_process_executor,
    description="Build the next gold-star and preference dataset versions from the reviews recorded so far.",
)


def dataset_run_config(project_id: str) -> dict:
    """The dataset job's config: both datasets of one project."""
    return {"ops": {name: {"config": {"project_id": project_id}}
                    for name in ("gold_star_dataset", "preference_dataset")}}


@sensor(job=gold_star_dataset_job, minimum_interval_seconds=10, default_status=DefaultSensorStatus.RUNNING)
def label_studio_sensor(context: SensorEvaluationContext, metadata_db: MetadataDB, label_studio: LabelStudio):
    """Tasks changed in Label Studio since the cursor (per project, ``updated_at``) are read with their
    annotations and recorded; a new gold_star_dataset is requested when reviews changed since the last one
    (from here, the webhook or the API), with its preference dataset. Label Studio down: skip, the cursor stays, nothing is lost."""
    if not label_studio.enabled:
        return SkipReason(label_studio.disabled_reason)
    db = metadata_db.db
    cursor = json.loads(context.cursor or "{}")
    read = changed = 0
    try:
        for team in label_studio.team_clients():  # each vbatch project's organization, with its own token
            for project_id in team.projects():
                tasks = team.changed_tasks(project_id, cursor.get(str(project_id)))
                for task in tasks:
                    changed += record_task(db, task, team.reviewer_name)
                if tasks:
                    read += len(tasks)
                    cursor[str(project_id)] = max(iso(task.updated_at) for task in tasks)
    except LabelStudioUnavailable as exc:
        return SkipReason(f"Label Studio is unreachable; will read from the same cursor next tick ({exc})")
    context.update_cursor(json.dumps(cursor, sort_keys=True))
    stale = projects_with_new_reviews(db)  # each project's dataset is built from its own reviews
    if stale:
        return [RunRequest(run_key=f"gold-star-dataset-{project}-{seq}",
                           run_config=dataset_run_config(project),
                           tags={CURATION_SEQ_TAG: str(seq), PROJECT_TAG: project})
                for project, seq in stale.items()]
    return SkipReason(f"Read {read} changed task(s), {changed} new review(s); datasets up to date")


defs = Definitions(
    assets=[curation_tasks, gold_star_dataset, preference_dataset],
    asset_checks=DATASET_CHECKS,
    jobs=[gold_star_dataset_job],
    sensors=[label_studio_sensor],
)
