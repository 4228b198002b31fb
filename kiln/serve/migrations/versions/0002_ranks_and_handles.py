"""jobs: ranks per job, and the executor's handle

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("nproc", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("handle", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("handle")
        batch.drop_column("nproc")
