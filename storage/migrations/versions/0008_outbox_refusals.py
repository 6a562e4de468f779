"""outbox.refusals: the peer's permanent refusals of an item since it was (re)queued. An item goes FAILED at
the sender's max_attempts of these; before, every attempt counted, so a PACS outage (attempts that never
reached the peer) used up the tries meant for refusals, and the first refusal after it failed the item.
Rows from before it start at 0.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | Sequence[str] | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('outbox') as batch:
        batch.add_column(sa.Column('refusals', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('outbox') as batch:
        batch.drop_column('refusals')
