"""projects and their API keys

- projects: a team's share of the platform (OpenAI's projects); ``proj_default`` holds the keys of
  VBATCH_API_KEYS and VBATCH_ADMIN_KEYS
- api_keys: a project's keys, only a hash of each secret kept, with name, owner, role (member | admin of the
  project), who created it, when it was last used and when it was revoked
- audit_events: who did what and when (installs, deletes, deploys, stars, edits, keys made and revoked)

Revision ID: 0009
Revises: 0008
"""

import time

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    projects = op.create_table(
        "projects",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False, index=True),
        sa.Column("archived_at", sa.BigInteger(), nullable=True),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("project_id", sa.String(64), nullable=False, index=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("redacted_value", sa.String(32), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False, index=True),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.Column("last_used_at", sa.BigInteger(), nullable=True),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False, index=True),
        sa.Column("type", sa.String(64), nullable=False, index=True),
        sa.Column("project_id", sa.String(64), nullable=False, index=True),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("details", sa.JSON(), nullable=True),
    )
    op.bulk_insert(projects, [{"id": "proj_default", "name": "Default project", "created_at": int(time.time()),
                               "archived_at": None}])


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("api_keys")
    op.drop_table("projects")
