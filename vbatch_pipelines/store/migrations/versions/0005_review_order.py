"""a curation task remembers when its recorded annotation was last updated in Label Studio, so a replayed or
late webhook event never overwrites a newer review

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("curation_tasks", sa.Column("annotation_updated_at", sa.String(40), nullable=True))


def downgrade() -> None:
    op.drop_column("curation_tasks", "annotation_updated_at")
