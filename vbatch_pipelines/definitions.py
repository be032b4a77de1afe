"""The vbatch code location. Loads fast: no torch, vLLM or transformers import here."""

from dagster import Definitions

from resources import FileStore, InferenceEngine, MetadataDB
from vbatch_pipelines.assets.batches import batch_input, batch_output
from vbatch_pipelines.assets.curation import (
    curation_tasks,
    gold_star_dataset,
    no_duplicate_prompts,
    no_empty_responses,
    train_eval_disjoint,
    valid_chat_structure,
)
from vbatch_pipelines.curation.server import label_studio_resource
from vbatch_pipelines.jobs import batch_job, gold_star_dataset_job
from vbatch_pipelines.sensors import batch_launch_sensor, batch_settle_sensor, label_studio_sensor
from vbatch_pipelines.settings import Settings, load_settings


def build_resources(settings: Settings) -> dict:
    return {
        "metadata_db": MetadataDB(url=settings.database_url),
        "file_store": FileStore(root=str(settings.home)),
        "inference_engine": InferenceEngine(
            backend=settings.engine_backend,
            home=str(settings.home),
            vllm_python=settings.vllm_python,
            gpus=settings.gpus,
        ),
        "label_studio": label_studio_resource(settings),
    }


defs = Definitions(
    assets=[batch_input, batch_output, curation_tasks, gold_star_dataset],
    asset_checks=[no_empty_responses, no_duplicate_prompts, valid_chat_structure, train_eval_disjoint],
    jobs=[batch_job, gold_star_dataset_job],
    sensors=[batch_launch_sensor, batch_settle_sensor, label_studio_sensor],
    resources=build_resources(load_settings()),
)
