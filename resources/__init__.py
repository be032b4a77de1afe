"""Dagster resources: thin typed clients for the systems vbatch drives."""

from resources.file_store import FileStore
from resources.inference_engine import InferenceEngine
from resources.label_studio import LabelStudio
from resources.metadata_db import MetadataDB
from resources.trainer import Trainer

__all__ = ["FileStore", "InferenceEngine", "LabelStudio", "MetadataDB", "Trainer"]
