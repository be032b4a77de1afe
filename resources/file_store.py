"""Where vbatch keeps its files: every path under the home directory is built here and nowhere else.

Uploaded files and batch results, gold-star datasets, fine-tuning jobs, installed models, the state of
managed engines and of the managed Label Studio, logs and the default Dagster home all live under one
root (``VBATCH_HOME``, default ``./.vbatch``).
"""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from vbatch_pipelines.models.registry import TINY_MODEL_ID


class FileStore(ConfigurableResource):
    root: str = Field(description="VBATCH_HOME: everything vbatch writes lives under it")

    @property
    def home(self) -> Path:
        return Path(self.root)

    @property
    def files_dir(self) -> Path:
        return self.home / "files"

    @property
    def batches_dir(self) -> Path:
        return self.home / "batches"

    def batch_dir(self, batch_id: str) -> Path:
        return self.batches_dir / batch_id

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def fine_tunes_dir(self) -> Path:
        return self.home / "fine_tunes"

    def fine_tune_dir(self, job_id: str) -> Path:
        return self.fine_tunes_dir / job_id

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def tiny_model_path(self) -> Path:
        """Where the locally built tiny chat model lives (built on first use)."""
        return self.models_dir / TINY_MODEL_ID

    @property
    def engines_dir(self) -> Path:
        """Managed vLLM servers' state files (pid, port, argv), one per base model."""
        return self.home / "engines"

    @property
    def label_studio_dir(self) -> Path:
        """The managed Label Studio's data and credentials."""
        return self.home / "label-studio"

    @property
    def run_dir(self) -> Path:
        """`vbatch up`'s lock and its record of the services it runs (run/services.json)."""
        return self.home / "run"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def dagster_dir(self) -> Path:
        """The Dagster instance's home unless DAGSTER_HOME points elsewhere."""
        return self.home / "dagster"

    @property
    def database_path(self) -> Path:
        """The SQLite metadata DB used when no VBATCH_DATABASE_URL is set."""
        return self.home / "vbatch.db"
