"""Jobs: a batch run validates the input, runs it and sends the results to curation, in one process
(the in-process executor saves ~2 s of subprocess start per step on small machines)."""

from dagster import AssetSelection, define_asset_job, in_process_executor

from vbatch_pipelines.assets.batches import batch_input, batch_output
from vbatch_pipelines.assets.curation import curation_tasks, gold_star_dataset
from vbatch_pipelines.assets.fine_tuning import deployed_model, fine_tuned_checkpoint, model_comparison
from vbatch_pipelines.assets.models import installed_model
from vbatch_pipelines.assets.retraining import retraining_request
from vbatch_pipelines.launch import BATCH_JOB, FINE_TUNING_JOB, INSTALL_MODEL_JOB
from vbatch_pipelines.partitions import batch_partitions, fine_tune_partitions, model_partitions

batch_job = define_asset_job(
    BATCH_JOB,
    selection=AssetSelection.assets(batch_input, batch_output, curation_tasks),
    partitions_def=batch_partitions,
    executor_def=in_process_executor,
    description="Validate a batch's input file, run every request on the warm engine, send results to review.",
)

gold_star_dataset_job = define_asset_job(
    "gold_star_dataset_job",
    selection=AssetSelection.assets(gold_star_dataset),
    executor_def=in_process_executor,
    description="Build the next gold-star dataset version from the reviews recorded so far.",
)

fine_tuning_job = define_asset_job(
    FINE_TUNING_JOB,
    selection=AssetSelection.assets(fine_tuned_checkpoint, model_comparison, deployed_model),
    partitions_def=fine_tune_partitions,
    executor_def=in_process_executor,
    description="Train a LoRA adapter, compare it with its base model, deploy it into the warm engine.",
)

installed_model_job = define_asset_job(
    INSTALL_MODEL_JOB,
    selection=AssetSelection.assets(installed_model),
    partitions_def=model_partitions,
    executor_def=in_process_executor,
    description="Download a base model at a pinned revision, smoke-test it on the engine, serve it.",
)

retraining_job = define_asset_job(
    "retraining_job",
    selection=AssetSelection.assets(retraining_request),
    executor_def=in_process_executor,
    description="Record a fine-tuning job on the latest gold stars (the retraining schedule runs it).",
)
