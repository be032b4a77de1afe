"""Dynamic partitions: one per batch (key: the batch id), per fine-tuning job (the job id) and per
installed model (the model id); an evaluation score per (eval set, model scored on it)."""

from dagster import DynamicPartitionsDefinition, MultiPartitionsDefinition

batch_partitions = DynamicPartitionsDefinition(name="batches")
fine_tune_partitions = DynamicPartitionsDefinition(name="fine_tunes")
model_partitions = DynamicPartitionsDefinition(name="models")
eval_set_partitions = DynamicPartitionsDefinition(name="eval_sets")
eval_model_partitions = DynamicPartitionsDefinition(name="eval_models")  # any model a set scored: base or fine-tune
eval_partitions = MultiPartitionsDefinition({"eval_set": eval_set_partitions, "model": eval_model_partitions})
