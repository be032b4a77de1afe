"""installation: this vbatch's own id, made once, for what it writes into databases it shares with others

- installation: one row (key ``vbatch``), the id (12 hex) that, e.g., Aris's rating rows in Aristotle carry, so two
  vbatch installs (or one whose Label Studio was reset) never write each other's rows

Revision ID: 0016
Revises: 0015
"""

import time
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "installation",
        sa.Column("key", sa.String(16), primary_key=True),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(table, [{"key": "vbatch", "id": uuid.uuid4().hex[:12], "created_at": int(time.time())}])


def downgrade() -> None:
    op.drop_table("installation")
