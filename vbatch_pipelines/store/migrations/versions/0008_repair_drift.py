"""repair: what homes made between a migration's first and final form lack

Two migrations changed after they were first committed, so a home made in between carries the right revision
but not the final schema (found by ``tests/test_upgrades.py`` on homes built at those commits):

- 0004 at c1ed616: no ``aris_links.example_since`` nor its ``ix_aris_links_examples`` index;
- 0005 at cf7f9f9: no ``batches.lease_owner``/``lease_until``, ``curation_tasks.review_error``,
  ``datasets.status`` nor ``fine_tuning_jobs.deployment``.

Each is added only where it is missing (a home made by the final forms has them all: nothing happens there).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

COLUMNS = (
    ("aris_links", lambda: sa.Column("example_since", sa.BigInteger(), nullable=True)),
    ("batches", lambda: sa.Column("lease_owner", sa.String(64), nullable=True)),
    ("batches", lambda: sa.Column("lease_until", sa.Float(), nullable=True)),
    ("curation_tasks", lambda: sa.Column("review_error", sa.Text(), nullable=True)),
    ("datasets", lambda: sa.Column("status", sa.String(16), nullable=False, server_default="ready")),
    ("fine_tuning_jobs", lambda: sa.Column("deployment", sa.JSON(), nullable=True)),
)
INDEXES = (("ix_aris_links_examples", "aris_links", ["philosopher", "domain", "example_since", "conquest_id"]),)


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    tables = set(inspector.get_table_names())
    for table, column in COLUMNS:
        wanted = column()
        if table in tables and wanted.name not in {c["name"] for c in inspector.get_columns(table)}:
            op.add_column(table, wanted)
    for name, table, columns in INDEXES:
        if table in tables and name not in {index["name"] for index in inspector.get_indexes(table)}:
            op.create_index(name, table, columns)


def downgrade() -> None:
    """Nothing to undo: the columns belong to 0004 and 0005, whose downgrades remove them."""
