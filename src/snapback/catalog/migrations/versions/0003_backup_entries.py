"""backup entries: the catalogue's cache of backup records (rebuilt from repositories)

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "backup_entries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("backup_id", sa.String(length=64), nullable=False),
        sa.Column("repo_location", sa.String(length=1024), nullable=False),
        sa.Column("repo_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("source_name", sa.String(length=128), nullable=True),
        sa.Column("source_pool", sa.String(length=128), nullable=True),
        sa.Column("source_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("parent_id", sa.String(length=64), nullable=True),
        sa.Column("mode", sa.String(length=16), nullable=True),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("recorded_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("backup_entries", schema=None) as batch_op:
        batch_op.create_index(
            "uq_backup_entries_location_backup", ["repo_location", "backup_id"], unique=True
        )
        batch_op.create_index(
            "ix_backup_entries_source", ["repo_location", "source_id", "created_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("backup_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_backup_entries_source")
        batch_op.drop_index("uq_backup_entries_location_backup")
    op.drop_table("backup_entries")
