"""instances.size_bytes: 64-bit, for instance files of 2 GiB or more; results.cluster_label: text.

SQLite took both as they came (its integers are 64-bit, its VARCHAR has no limit); PostgreSQL refused an
instance file of 2 GiB or more (whole-slide images, long multi-frame objects), so the listener quarantined
each such instance and no retry could store it, and a detector's cluster label over 64 characters, which
failed the job after its SR and SC were written. There is no size column elsewhere (outbox and quarantine
rows keep none). The downgrade fails on PostgreSQL while such a size or label is stored, rather than
losing it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('instances') as batch:
        batch.alter_column('size_bytes', existing_type=sa.Integer(), type_=sa.BigInteger(),
                           existing_nullable=False)
    with op.batch_alter_table('results') as batch:
        batch.alter_column('cluster_label', existing_type=sa.String(length=64), type_=sa.Text(),
                           existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('results') as batch:
        batch.alter_column('cluster_label', existing_type=sa.Text(), type_=sa.String(length=64),
                           existing_nullable=False)
    with op.batch_alter_table('instances') as batch:
        batch.alter_column('size_bytes', existing_type=sa.BigInteger(), type_=sa.Integer(),
                           existing_nullable=False)
