"""What vbatch keeps and for how long, and how much disk it leaves free: one typed resource, read by the retention
job (files, runs, logs) and by the API (expiry shown on files, the free-space floor on new work).

A file's expiry is its own ``expires_at`` when it set one (OpenAI's ``expires_after``), else, for batch input
and output files, ``created_at`` plus ``file_retention_days`` as the setting is now; other files stay until
deleted. So lowering VBATCH_FILE_RETENTION_DAYS frees space at the next retention run.
"""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from vbatch_pipelines.retention import file_expires_at


class RetentionPolicy(ConfigurableResource):
    file_retention_days: int | None = Field(default=30, ge=1, description="batch input/output files that set no "
                                            "expiry are deleted this long after creation; None keeps them "
                                            "(VBATCH_FILE_RETENTION_DAYS)")
    run_retention_days: int | None = Field(default=30, ge=1, description="finished Dagster runs and their event "
                                           "logs older than this are deleted (VBATCH_RUN_RETENTION_DAYS)")
    log_max_bytes: int | None = Field(default=100 * 1024 * 1024, ge=4096, description="service and engine logs "
                                      "larger than this are rotated (VBATCH_LOG_MAX_BYTES); None: never")
    log_backups: int = Field(default=3, ge=1, description="rotated copies kept of each log (VBATCH_LOG_BACKUPS)")
    min_free_disk_percent: float = Field(default=5.0, ge=0, lt=100, description="below this share of the store's "
                                         "filesystem free, new batches and uploads are refused with 507 "
                                         "(VBATCH_MIN_FREE_DISK_PERCENT); 0: never")

    def file_expires_at(self, created_at: int, purpose: str, expires_at: int | None) -> int | None:
        """When a file expires: its own expiry, else its purpose's default (None: kept until deleted)."""
        return file_expires_at(created_at, purpose, expires_at, self.file_retention_days)
