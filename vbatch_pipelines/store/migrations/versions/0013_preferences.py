"""preference fine-tuning and fixed evaluation sets: preference datasets beside gold-star ones, DPO jobs

- datasets.kind: ``sft`` (gold stars: chat examples) or ``preference`` (chosen/rejected pairs)
- fine_tuning_jobs.method: OpenAI's method object (``{"type": "dpo", "dpo": {...}}``); NULL: supervised
- fine_tuning_jobs.starting_model: the fine-tune a job continues (``ft:...``); NULL: it starts from ``model``
- eval_sets, eval_runs: fixed evaluation sets and the models scored on them

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("datasets", sa.Column("kind", sa.String(16), nullable=False, server_default="sft"))
    op.create_index("ix_datasets_kind", "datasets", ["kind"])
    op.add_column("fine_tuning_jobs", sa.Column("method", sa.JSON(), nullable=True))
    op.add_column("fine_tuning_jobs", sa.Column("starting_model", sa.String(512), nullable=True))
    owned = [sa.Column("project_id", sa.String(64), nullable=False, server_default="proj_default"),
             sa.Column("created_by", sa.String(128), nullable=True)]
    op.create_table(
        "eval_sets",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.JSON(), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        *owned,
    )
    op.create_index("ix_eval_sets_created_at", "eval_sets", ["created_at"])
    op.create_index("ix_eval_sets_project_id", "eval_sets", ["project_id"])
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("eval_id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(512), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("rows", sa.JSON(), nullable=True),
        sa.Column("batches", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("dagster_run_id", sa.String(64), nullable=True),
        *[column.copy() for column in owned],
    )
    for column in ("eval_id", "status", "created_at", "project_id"):
        op.create_index(f"ix_eval_runs_{column}", "eval_runs", [column])


def downgrade() -> None:
    op.drop_table("eval_runs")
    op.drop_table("eval_sets")
    op.drop_column("fine_tuning_jobs", "starting_model")
    op.drop_column("fine_tuning_jobs", "method")
    op.drop_index("ix_datasets_kind", "datasets")
    op.drop_column("datasets", "kind")
