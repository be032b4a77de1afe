"""engine keys: each managed vLLM server takes requests only with the key vbatch made at its start

- engines.api_key: a managed engine's key, for the other nodes that send it requests; NULL: an external engine,
  or one started before keys

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("engines", sa.Column("api_key", sa.String(128), nullable=True))


def downgrade() -> None:
    op.drop_column("engines", "api_key")
