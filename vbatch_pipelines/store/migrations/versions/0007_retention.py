"""retention: when a batch's result files expire, and a fast look-up of expired files

- batches.output_expires_after: seconds after its output and error files are created that they expire (OpenAI's
  ``output_expires_after``); NULL: the default retention of batch files (VBATCH_FILE_RETENTION_DAYS)
- files.expires_at is indexed: the retention job asks for the files whose expiry has passed

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("output_expires_after", sa.BigInteger(), nullable=True))
    op.create_index("ix_files_expires_at", "files", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_files_expires_at", table_name="files")
    op.drop_column("batches", "output_expires_after")
