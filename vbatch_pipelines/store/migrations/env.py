"""Alembic environment: runs against the connection vbatch hands it (see store/db.py)."""

from alembic import context

from vbatch_pipelines.store.models import Base

connection = context.config.attributes["connection"]
# Own version table: the same database may also hold Dagster's storage, which uses alembic_version.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  version_table="vbatch_alembic_version")
with context.begin_transaction():
    context.run_migrations()
