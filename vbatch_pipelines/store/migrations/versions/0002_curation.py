"""curation tasks and gold-star datasets

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "curation_tasks",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("custom_id", sa.String(512), nullable=False),
        sa.Column("schema", sa.String(64), nullable=False),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=True),
        sa.Column("ls_task_id", sa.Integer(), nullable=True, unique=True),
        sa.Column("annotation_id", sa.Integer(), nullable=True),
        sa.Column("edited_response", sa.Text(), nullable=True),
        sa.Column("rating", sa.Integer(), nullable=True),
        sa.Column("gold_star", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("annotated", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("reviewed_at", sa.BigInteger(), nullable=True),
        sa.Column("changed_seq", sa.BigInteger(), nullable=False, server_default="0"),
        sa.UniqueConstraint("batch_id", "custom_id", name="uq_curation_tasks_batch_custom_id"),
    )
    op.create_index("ix_curation_tasks_batch_id", "curation_tasks", ["batch_id"])
    op.create_index("ix_curation_tasks_schema", "curation_tasks", ["schema"])
    op.create_index("ix_curation_tasks_gold_star", "curation_tasks", ["gold_star"])
    op.create_index("ix_curation_tasks_changed_seq", "curation_tasks", ["changed_seq"])
    op.create_table(
        "datasets",
        sa.Column("version", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("examples", sa.Integer(), nullable=False),
        sa.Column("train_examples", sa.Integer(), nullable=False),
        sa.Column("eval_examples", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("source_seq", sa.BigInteger(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("dagster_run_id", sa.String(64), nullable=True),
    )
    op.create_index("ix_datasets_created_at", "datasets", ["created_at"])


def downgrade() -> None:
    op.drop_table("datasets")
    op.drop_table("curation_tasks")
