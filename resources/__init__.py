"""Dagster resources: thin typed clients for the systems vbatch drives. ``resources.factory`` builds them
from settings (the code location, the API and the CLI call it)."""

from resources.file_store import FileStore
from resources.inference_engine import InferenceEngine
from resources.label_studio import LabelStudio
from resources.metadata_db import MetadataDB
from resources.model_registry import ModelRegistry
from resources.retention_policy import RetentionPolicy
from resources.retraining_policy import RetrainingPolicy
from resources.trainer import Trainer

__all__ = ["FileStore", "InferenceEngine", "LabelStudio", "MetadataDB", "ModelRegistry", "RetentionPolicy",
           "RetrainingPolicy", "Trainer"]
