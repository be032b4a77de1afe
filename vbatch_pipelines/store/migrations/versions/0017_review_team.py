"""a review team: several reviewers per task, k of N agreeing for a gold star, assignments, filtered datasets

- curation_reviews: each live Label Studio annotation of a task (one row per annotation): who made it, what it
  says (answer, rating, gold star) and when; a task's gold star is counted from its reviewers' latest ones
- curation_assignments: which reviewers a task is handed to (vbatch's queue; Label Studio Community has none)
- curation_tasks.reviews / gold_votes / agreement: how many reviewers reviewed it, how many of them starred it, the
  share who agree with the majority (NULL below two reviewers)
- projects.review_annotations / review_agreement: N annotations wanted per task, k gold-star votes for a gold star
- datasets.filter: what a version was built from (NULL: every gold star); fine_tuning_jobs.dataset_filter likewise

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "curation_reviews",
        sa.Column("annotation_id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("ls_task_id", sa.Integer(), nullable=False, index=True),
        sa.Column("reviewer", sa.String(256), nullable=False),
        sa.Column("answer", sa.Text(), nullable=True),
        sa.Column("rating", sa.Integer(), nullable=True),
        sa.Column("gold_star", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=True),
        sa.Column("recorded_at", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_curation_reviews_reviewer", "curation_reviews", ["reviewer"])
    op.create_table(
        "curation_assignments",
        sa.Column("ls_task_id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("reviewer", sa.String(256), primary_key=True),
        sa.Column("assigned_at", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_curation_assignments_reviewer", "curation_assignments", ["reviewer"])
    op.add_column("curation_tasks", sa.Column("reviews", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("curation_tasks", sa.Column("gold_votes", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("curation_tasks", sa.Column("agreement", sa.Float(), nullable=True))
    # tasks reviewed before: one reviewer each
    op.execute("UPDATE curation_tasks SET reviews = 1 WHERE annotated")
    op.execute("UPDATE curation_tasks SET gold_votes = 1 WHERE gold_star")
    op.add_column("projects", sa.Column("review_annotations", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("projects", sa.Column("review_agreement", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("datasets", sa.Column("filter", sa.JSON(), nullable=True))
    op.add_column("fine_tuning_jobs", sa.Column("dataset_filter", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("fine_tuning_jobs", "dataset_filter")
    op.drop_column("datasets", "filter")
    op.drop_column("projects", "review_agreement")
    op.drop_column("projects", "review_annotations")
    for column in ("agreement", "gold_votes", "reviews"):
        op.drop_column("curation_tasks", column)
    op.drop_table("curation_assignments")
    op.drop_table("curation_reviews")
