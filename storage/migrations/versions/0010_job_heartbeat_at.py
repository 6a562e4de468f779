"""jobs.heartbeat_at: the last sign of life of the worker running a job. With external workers (`medgru
serve --no-worker`) a job whose worker was killed (out of memory, kill -9, a lost host) stayed RUNNING until
the broker re-delivered its message (Redis: after its 3 h visibility timeout), or for ever when the broker
lost the message (Redis restarted without persistence); nothing re-queued it and an admin could neither
retry nor cancel it. The service's sweeper re-queues a RUNNING job whose heartbeat is older than
job_stale_after_s. NULL (rows from before it): the job's started_at.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | Sequence[str] | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('heartbeat_at')
