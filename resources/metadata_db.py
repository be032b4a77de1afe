"""The metadata DB (files, batches, progress) as a Dagster resource."""

from __future__ import annotations

from dagster import ConfigurableResource

from vbatch_pipelines.store.db import Database, get_database


class MetadataDB(ConfigurableResource):
    """SQLAlchemy URL: ``sqlite:///...`` (default under VBATCH_HOME) or ``postgresql://...``."""

    url: str

    @property
    def db(self) -> Database:
        return get_database(self.url)
