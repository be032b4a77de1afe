"""Where vbatch keeps its files: every path vbatch writes is built here and nowhere else.

Two roots. The store (``VBATCH_STORE``, default the home) holds what every node of a cluster must see:
uploaded files and batch results, gold-star datasets, fine-tuning jobs, installed models, and Dagster's
compute logs in cluster mode; nodes share it over a shared filesystem mounted at the same path. The home
(``VBATCH_HOME``, default ``./.vbatch``) holds what belongs to one node: the state of its managed engines and
Label Studio, its run dir and logs, its Dagster home and the SQLite metadata DB of single-machine mode.

``StoreLayout`` is a plain class, so that what needs only paths (loading the settings, `vbatch up`'s supervisor)
does not import Dagster; ``resources.file_store.FileStore`` is the same layout as a Dagster resource.
"""

from __future__ import annotations

from pathlib import Path

from vbatch_pipelines.models.registry import TINY_EMBED_MODEL_ID, TINY_MODEL_ID


class StoreLayout:
    # ``root`` (VBATCH_HOME: this node's own state) and ``store`` (VBATCH_STORE: files every node shares; None:
    # the home) are set by __init__ here and are the fields of the FileStore resource.

    def __init__(self, root: str, store: str | None = None):
        self.root, self.store = root, store

    @classmethod
    def of(cls, home: Path, store: Path | None):
        """The layout of a home and an optional store."""
        return cls(root=str(home), store=str(store) if store else None)

    @property
    def home(self) -> Path:
        return Path(self.root)

    @property
    def shared(self) -> Path:
        """The store root: on a shared filesystem when several nodes run vbatch."""
        return Path(self.store) if self.store else self.home

    @property
    def files_dir(self) -> Path:
        return self.shared / "files"

    @property
    def batches_dir(self) -> Path:
        return self.shared / "batches"

    def batch_dir(self, batch_id: str) -> Path:
        return self.batches_dir / batch_id

    @property
    def datasets_dir(self) -> Path:
        return self.shared / "datasets"

    @property
    def evals_dir(self) -> Path:
        """Frozen evaluation sets, one directory each."""
        return self.shared / "evals"

    @property
    def fine_tunes_dir(self) -> Path:
        return self.shared / "fine_tunes"

    def fine_tune_dir(self, job_id: str) -> Path:
        return self.fine_tunes_dir / job_id

    @property
    def models_dir(self) -> Path:
        return self.shared / "models"

    @property
    def tiny_model_path(self) -> Path:
        """Where the locally built tiny chat model lives (built on first use)."""
        return self.models_dir / TINY_MODEL_ID

    @property
    def tiny_embed_model_path(self) -> Path:
        """Where the locally built tiny embedding model lives (built on first use)."""
        return self.models_dir / TINY_EMBED_MODEL_ID

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
    def shared_dagster_dir(self) -> Path:
        """Cluster mode: Dagster's compute logs and artifacts, so the UI shows a run's output from any node."""
        return self.shared / "dagster"

    @property
    def dagster_dir(self) -> Path:
        """The Dagster instance's home unless DAGSTER_HOME points elsewhere."""
        return self.home / "dagster"

    @property
    def database_path(self) -> Path:
        """The SQLite metadata DB used when no VBATCH_DATABASE_URL is set."""
        return self.home / "vbatch.db"
