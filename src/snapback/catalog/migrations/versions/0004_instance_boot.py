"""instance boot files: an instance's own kernel, ramdisk and command line (as nova's
instance.kernel_id / ramdisk_id), set when a restore brings them from a repository

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kernel_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("ramdisk_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("os_command_line", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("os_command_line")
        batch_op.drop_column("ramdisk_id")
        batch_op.drop_column("kernel_id")
