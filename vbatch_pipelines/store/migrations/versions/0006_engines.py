"""engines: the inference servers vbatch can send requests to, on any node

- engines: one row per server (a replica of a base model): those vbatch starts on a node (``managed``, with their
  pid) and those that run elsewhere (``external``, from VBATCH_ENGINES), their base URL, node, whether they
  answered when last checked, and the LoRA adapters loaded into them

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "engines",
        sa.Column("id", sa.String(160), primary_key=True),
        sa.Column("model", sa.String(512), nullable=False, index=True),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("adapters", sa.JSON(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("checked_at", sa.Float(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("engines")
