"""Where file bytes live: uploaded files and each batch's working directory (local disk)."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource


class FileStore(ConfigurableResource):
    root: str

    @property
    def files_dir(self) -> Path:
        return Path(self.root) / "files"

    @property
    def batches_dir(self) -> Path:
        return Path(self.root) / "batches"

    def batch_dir(self, batch_id: str) -> Path:
        return self.batches_dir / batch_id
