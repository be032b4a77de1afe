"""the Aris extension's own state: conquest links, sync events; a curation task's reviewer

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("curation_tasks", sa.Column("reviewer", sa.String(256), nullable=True))
    op.create_table(
        "aris_links",
        sa.Column("conquest_id", sa.String(256), primary_key=True),
        sa.Column("ls_task_id", sa.Integer(), nullable=True, unique=True),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.Column("philosopher", sa.String(256), nullable=True),
        sa.Column("domain", sa.String(256), nullable=True),
        sa.Column("conquest_type", sa.String(128), nullable=True),
        sa.Column("agreed_gold", sa.Boolean(), nullable=True),
        sa.Column("seen_result", sa.String(32), nullable=True),
        sa.Column("seen_updated_at", sa.String(40), nullable=True),
        sa.Column("prior_result", sa.String(32), nullable=True),
        sa.Column("pending", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("example_since", sa.BigInteger(), nullable=True),
        sa.Column("icl_uses", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("icl_last_used_at", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_aris_links_pending", "aris_links", ["pending"])
    op.create_index("ix_aris_links_owner", "aris_links", ["philosopher", "domain"])
    op.create_index("ix_aris_links_examples", "aris_links", ["philosopher", "domain", "example_since", "conquest_id"])
    op.create_table(
        "aris_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("conquest_id", sa.String(256), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_aris_events_conquest_id", "aris_events", ["conquest_id"])
    op.create_index("ix_aris_events_kind", "aris_events", ["kind"])


def downgrade() -> None:
    op.drop_table("aris_events")
    op.drop_table("aris_links")
    op.drop_column("curation_tasks", "reviewer")
