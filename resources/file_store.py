"""Where vbatch keeps its files (``vbatch_pipelines.layout``), as a Dagster resource."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from vbatch_pipelines.layout import StoreLayout


class FileStore(ConfigurableResource, StoreLayout):
    """``StoreLayout``'s paths, configured as a resource (its fields are the layout's roots)."""

    root: str = Field(description="VBATCH_HOME: this node's own state (engines, run dir, logs, Dagster home)")
    store: str | None = Field(default=None, description="VBATCH_STORE: files every node shares (files, batches, "
                                                        "datasets, fine-tunes, models); default the home")
