"""instances.patient_fk: the patient each instance names. The prior study of a series was looked up by the
patient its study was first recorded for, so an instance of patient B filed under a Study Instance UID
first seen with patient A (a reused UID, a corrected PatientID) got patient A's prior study prepended to
its frames. Rows from before it take their study's patient, which is what was assumed until now.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | Sequence[str] | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('instances') as batch:
        batch.add_column(sa.Column('patient_fk', sa.Integer(), nullable=True))
        batch.create_index(batch.f('ix_instances_patient_fk'), ['patient_fk'], unique=False)
        batch.create_foreign_key(batch.f('fk_instances_patient_fk_patients'), 'patients', ['patient_fk'], ['id'])
    op.execute(
        "UPDATE instances SET patient_fk = (SELECT studies.patient_fk FROM series JOIN studies "
        "ON studies.id = series.study_fk WHERE series.id = instances.series_fk)"
    )


def downgrade() -> None:
    with op.batch_alter_table('instances') as batch:
        batch.drop_constraint(batch.f('fk_instances_patient_fk_patients'), type_='foreignkey')
        batch.drop_index(batch.f('ix_instances_patient_fk'))
        batch.drop_column('patient_fk')
