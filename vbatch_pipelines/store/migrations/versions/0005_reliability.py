"""reliability: review ordering, review validation, batch leases, dataset versions claimed before they are written

- curation_tasks.annotation_updated_at: when the recorded annotation was last updated in Label Studio, so a
  replayed or late webhook event never overwrites a newer review
- curation_tasks.review_error: why a review's edited answer is invalid for its schema (kept out of datasets)
- batches.lease_owner / lease_until: the one run allowed to work on a batch, renewed while it runs
- datasets.status: ``building`` while a claimed version is written, ``ready`` once complete
- fine_tuning_jobs.deployment: whether the fine-tune is served (deployed, rejected by the gate, undeployed) and why

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
    op.add_column("curation_tasks", sa.Column("review_error", sa.Text(), nullable=True))
    op.add_column("batches", sa.Column("lease_owner", sa.String(64), nullable=True))
    op.add_column("batches", sa.Column("lease_until", sa.Float(), nullable=True))
    op.add_column("datasets", sa.Column("status", sa.String(16), nullable=False, server_default="ready"))
    op.add_column("fine_tuning_jobs", sa.Column("deployment", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("fine_tuning_jobs", "deployment")
    op.drop_column("datasets", "status")
    op.drop_column("batches", "lease_until")
    op.drop_column("batches", "lease_owner")
    op.drop_column("curation_tasks", "review_error")
    op.drop_column("curation_tasks", "annotation_updated_at")
