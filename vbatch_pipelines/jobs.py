"""Jobs: a batch run validates the input, runs it and sends the results to curation, in one process
(the in-process executor saves ~2 s of subprocess start per step on small machines)."""

from dagster import AssetSelection, define_asset_job, in_process_executor

from vbatch_pipelines.assets.batches import batch_input, batch_output
from vbatch_pipelines.assets.curation import curation_tasks, gold_star_dataset
from vbatch_pipelines.launch import BATCH_JOB
from vbatch_pipelines.partitions import batch_partitions

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
