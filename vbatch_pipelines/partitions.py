"""Partitions: one per batch (the partition key is the batch id)."""

from dagster import DynamicPartitionsDefinition

batch_partitions = DynamicPartitionsDefinition(name="batches")
