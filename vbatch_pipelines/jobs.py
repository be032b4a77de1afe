"""Jobs: a batch run validates the input and runs it, in one process (the in-process executor saves
~2 s of subprocess start per step on small machines)."""

from dagster import AssetSelection, define_asset_job, in_process_executor

from vbatch_pipelines.assets.batches import batch_input, batch_output
from vbatch_pipelines.launch import BATCH_JOB
from vbatch_pipelines.partitions import batch_partitions

batch_job = define_asset_job(
    BATCH_JOB,
    selection=AssetSelection.assets(batch_input, batch_output),
    partitions_def=batch_partitions,
    executor_def=in_process_executor,
    description="Validate a batch's input file and run every request on the warm engine.",
)
