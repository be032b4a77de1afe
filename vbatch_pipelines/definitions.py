"""The vbatch code location. Loads fast: no torch, vLLM or transformers import here."""

from dagster import Definitions

from resources import FileStore, InferenceEngine, MetadataDB
from vbatch_pipelines.assets.batches import batch_input, batch_output
from vbatch_pipelines.jobs import batch_job
from vbatch_pipelines.sensors import batch_launch_sensor, batch_settle_sensor
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
    }


defs = Definitions(
    assets=[batch_input, batch_output],
    jobs=[batch_job],
    sensors=[batch_launch_sensor, batch_settle_sensor],
    resources=build_resources(load_settings()),
)
