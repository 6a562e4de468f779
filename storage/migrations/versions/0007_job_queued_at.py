"""jobs.queued_at: when a job was last put on the queue (created, retried by an admin, or re-queued after an
interrupted run). The "oldest waiting job" gauge reads it: measured from created_at, a job an admin
retried after days counted as days old and set off the queue-stalled alert. NULL (rows from before it):
the job's created_at.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | Sequence[str] | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('queued_at')
