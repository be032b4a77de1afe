"""preference fine-tuning: preference datasets beside gold-star ones, DPO jobs

- datasets.kind: ``sft`` (gold stars: chat examples) or ``preference`` (chosen/rejected pairs)
- fine_tuning_jobs.method: OpenAI's method object (``{"type": "dpo", "dpo": {...}}``); NULL: supervised
- fine_tuning_jobs.starting_model: the fine-tune a job continues (``ft:...``); NULL: it starts from ``model``

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


def downgrade() -> None:
    op.drop_column("fine_tuning_jobs", "starting_model")
    op.drop_column("fine_tuning_jobs", "method")
    op.drop_index("ix_datasets_kind", "datasets")
    op.drop_column("datasets", "kind")
