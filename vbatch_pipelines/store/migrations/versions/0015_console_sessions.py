"""console sessions: the console's cookie is a session token, not the API key it was opened with

- console_sessions: a session (the SHA-256 of its token), the SHA-256 of the key it was opened with (the caller is
  looked up through it on each request, so revoking the key ends its sessions), when it expires or was ended

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False, index=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False, index=True),
        sa.Column("ended_at", sa.BigInteger(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("console_sessions")
