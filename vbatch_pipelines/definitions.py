"""The vbatch code location. Loads fast: no torch, vLLM or transformers import here."""

from dagster import Definitions

from resources import FileStore, InferenceEngine, MetadataDB, Trainer
from vbatch_pipelines.assets.batches import batch_input, batch_output
from vbatch_pipelines.assets.curation import (
    curation_tasks,
    gold_star_dataset,
    no_duplicate_prompts,
    no_empty_responses,
    train_eval_disjoint,
    valid_chat_structure,
)
from vbatch_pipelines.assets.fine_tuning import deployed_model, fine_tuned_checkpoint, model_comparison
from vbatch_pipelines.assets.models import installed_model
from vbatch_pipelines.assets.retraining import retraining_request
from vbatch_pipelines.curation.server import label_studio_resource
from vbatch_pipelines.jobs import (
    batch_job,
    fine_tuning_job,
    gold_star_dataset_job,
    installed_model_job,
    retraining_job,
)
from vbatch_pipelines.sensors import (
    batch_launch_sensor,
    batch_settle_sensor,
    fine_tuning_sensor,
    label_studio_sensor,
    model_install_sensor,
    retraining_automation,
    retraining_schedule,
)
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
            max_lora_rank=settings.max_lora_rank,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_fraction if settings.gpus else None,
        ),
        "trainer": Trainer(backend=settings.trainer, gpus=settings.gpus, envs_dir=str(settings.envs_dir)),
        "label_studio": label_studio_resource(settings),
    }


SETTINGS = load_settings()

defs = Definitions(
    assets=[batch_input, batch_output, curation_tasks, gold_star_dataset, fine_tuned_checkpoint, model_comparison,
            deployed_model, installed_model, retraining_request],
    asset_checks=[no_empty_responses, no_duplicate_prompts, valid_chat_structure, train_eval_disjoint],
    jobs=[batch_job, gold_star_dataset_job, fine_tuning_job, installed_model_job, retraining_job],
    sensors=[batch_launch_sensor, batch_settle_sensor, label_studio_sensor, fine_tuning_sensor,
             model_install_sensor, retraining_automation],
    schedules=[retraining_schedule(SETTINGS.retrain_cron)] if SETTINGS.retrain_cron else [],
    resources=build_resources(SETTINGS),
)
