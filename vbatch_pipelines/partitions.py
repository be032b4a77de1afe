"""Dynamic partitions: one per batch (key: the batch id), per fine-tuning job (the job id) and per
installed model (the model id)."""

from dagster import DynamicPartitionsDefinition

batch_partitions = DynamicPartitionsDefinition(name="batches")
fine_tune_partitions = DynamicPartitionsDefinition(name="fine_tunes")
model_partitions = DynamicPartitionsDefinition(name="models")
