"""What vbatch keeps and for how long, and how much disk it leaves free: one typed resource, read by the retention
job (files, runs, logs) and by the API (expiry shown on files, the free-space floor on new work).

A file's expiry is its own ``expires_at`` when it set one (OpenAI's ``expires_after``), else, for batch input
and output files, ``created_at`` plus ``file_retention_days`` as the setting is now; other files stay until
deleted. So lowering VBATCH_FILE_RETENTION_DAYS frees space at the next retention run.
"""

from __future__ import annotations

from resources.config import config_of
from vbatch_pipelines.retention import file_expires_at
from vbatch_pipelines.settings import RetentionSettings


class RetentionPolicy(config_of(RetentionSettings, exclude=["cron"])):
    """RetentionSettings but the schedule (the code location builds that from the setting)."""

    def file_expires_at(self, created_at: int, purpose: str, expires_at: int | None) -> int | None:
        """When a file expires: its own expiry, else its purpose's default (None: kept until deleted)."""
        return file_expires_at(created_at, purpose, expires_at, self.file_retention_days)
