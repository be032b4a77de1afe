"""usage: input tokens served without the engine (lines answered with an identical line's response)

- usage_records.input_cached_tokens: counted in input_tokens too, as OpenAI's usage API counts cached tokens

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage_records", sa.Column("input_cached_tokens", sa.BigInteger(), nullable=False,
                                             server_default="0"))


def downgrade() -> None:
    op.drop_column("usage_records", "input_cached_tokens")
