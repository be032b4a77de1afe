"""usage and quotas: what each project used, by the minute, and what it may use

- usage_records: one row per ended batch (its requests, tokens and the seconds it ran on the engine) and online
  requests summed per minute, key, model and kind (completions | embeddings)
- projects: quotas (max_concurrent_batches, max_queued_requests, max_tokens_per_day; NULL: no limit) and the
  project's weight in the engine's fair share (default 1)

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("minute", sa.BigInteger(), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("project_id", sa.String(64), nullable=False, index=True),
        sa.Column("api_key_id", sa.String(128), nullable=True),
        sa.Column("model", sa.String(512), nullable=True),
        sa.Column("batch", sa.Boolean(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("engine_seconds", sa.Float(), nullable=False),
        sa.Column("batch_id", sa.String(64), nullable=True, unique=True),
    )
    op.create_index("ix_usage_records_project_minute", "usage_records", ["project_id", "minute"])
    op.add_column("projects", sa.Column("max_concurrent_batches", sa.Integer(), nullable=True))
    op.add_column("projects", sa.Column("max_queued_requests", sa.BigInteger(), nullable=True))
    op.add_column("projects", sa.Column("max_tokens_per_day", sa.BigInteger(), nullable=True))
    op.add_column("projects", sa.Column("weight", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    for column in ("weight", "max_tokens_per_day", "max_queued_requests", "max_concurrent_batches"):
        op.drop_column("projects", column)
    op.drop_table("usage_records")
