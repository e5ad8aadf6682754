"""instances

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:

    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("domain_name", sa.String(length=128), nullable=False),
        sa.Column("image_id", sa.String(length=36), nullable=True),
        sa.Column("memory_mib", sa.Integer(), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("domain_name"),
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(
            "uq_instances_live_name",
            ["name"],
            unique=True,
            sqlite_where=sa.text("status != 'deleted'"),
            postgresql_where=sa.text("status != 'deleted'"),
        )

    op.create_table(
        "instance_disks",
        sa.Column("instance_id", sa.String(length=36), nullable=False),
        sa.Column("target", sa.String(length=16), nullable=False),
        sa.Column("volume_id", sa.String(length=36), nullable=False),
        sa.Column("root", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
        ),
        sa.ForeignKeyConstraint(
            ["volume_id"],
            ["volumes.id"],
        ),
        sa.PrimaryKeyConstraint("instance_id", "target"),
    )


def downgrade() -> None:

    op.drop_table("instance_disks")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_instances_live_name",
            sqlite_where=sa.text("status != 'deleted'"),
            postgresql_where=sa.text("status != 'deleted'"),
        )

    op.drop_table("instances")
