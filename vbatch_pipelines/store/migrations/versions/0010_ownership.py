"""ownership: every file, batch, fine-tuning job, dataset version and curation task belongs to a project

- files, batches, fine_tuning_jobs, datasets, curation_tasks: ``project_id`` (what was there belongs to
  ``proj_default``, the project of VBATCH_API_KEYS) and ``created_by`` (the key that created it)
- curation_tasks.project_id, the Label Studio project a task went to, is renamed ``ls_project_id``
- models: a fine-tune's ``project_id`` (base models: NULL, everyone's), ``shared`` (an admin shared it with
  every project) and ``created_by``

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

OWNED = ("files", "batches", "fine_tuning_jobs", "datasets", "curation_tasks")


def upgrade() -> None:
    # Both SQLite (3.25+) and PostgreSQL rename in place; a batch copy of the table is not needed.
    op.execute("ALTER TABLE curation_tasks RENAME COLUMN project_id TO ls_project_id")
    for table in OWNED:
        op.add_column(table, sa.Column("project_id", sa.String(64), nullable=False, server_default="proj_default"))
        op.add_column(table, sa.Column("created_by", sa.String(128), nullable=True))
        op.create_index(f"ix_{table}_project_id", table, ["project_id"])
    op.add_column("models", sa.Column("project_id", sa.String(64), nullable=True))
    op.add_column("models", sa.Column("shared", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("models", sa.Column("created_by", sa.String(128), nullable=True))
    op.create_index("ix_models_project_id", "models", ["project_id"])
    op.execute("UPDATE models SET project_id = 'proj_default' WHERE kind = 'fine_tune'")


def downgrade() -> None:
    op.drop_index("ix_models_project_id", table_name="models")
    for column in ("created_by", "shared", "project_id"):
        op.drop_column("models", column)
    for table in OWNED:
        op.drop_index(f"ix_{table}_project_id", table_name=table)
        op.drop_column(table, "created_by")
        op.drop_column(table, "project_id")
    op.execute("ALTER TABLE curation_tasks RENAME COLUMN ls_project_id TO project_id")
