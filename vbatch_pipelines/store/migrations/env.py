"""Alembic environment: runs against the connection vbatch hands it (see store/db.py)."""

from alembic import context

from vbatch_pipelines.store.db import VERSION_TABLE
from vbatch_pipelines.store.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
