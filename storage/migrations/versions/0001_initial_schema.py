"""Initial schema: exactly the tables of storage/models.py at the first release.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('patients',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('issuer', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('patient_id', 'issuer', name='uq_patient_id_issuer')
    )
    op.create_index(op.f('ix_patients_patient_id'), 'patients', ['patient_id'], unique=False)

    op.create_table('quarantine',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('studies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_fk', sa.Integer(), nullable=False),
    sa.Column('study_date', sa.String(length=8), nullable=False),
    sa.Column('study_time', sa.String(length=16), nullable=False),
    sa.Column('accession_number', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_fk'], ['patients.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_studies_patient_fk'), 'studies', ['patient_fk'], unique=False)
    op.create_index(op.f('ix_studies_study_uid'), 'studies', ['study_uid'], unique=True)

    op.create_table('series',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('study_fk', sa.Integer(), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('body_part', sa.String(length=64), nullable=False),
    sa.Column('series_description', sa.String(length=128), nullable=False),
    sa.Column('series_number', sa.Integer(), nullable=True),
    sa.Column('state', sa.Enum('receiving', 'assembled', 'ignored', name='seriesstate', native_enum=False, length=32), nullable=False),
    sa.Column('state_reason', sa.Text(), nullable=False),
    sa.Column('first_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_fk'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_series_last_received_at'), 'series', ['last_received_at'], unique=False)
    op.create_index(op.f('ix_series_series_uid'), 'series', ['series_uid'], unique=True)
    op.create_index(op.f('ix_series_state'), 'series', ['state'], unique=False)
    op.create_index(op.f('ix_series_study_fk'), 'series', ['study_fk'], unique=False)

    op.create_table('instances',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('series_fk', sa.Integer(), nullable=False),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('instance_number', sa.Integer(), nullable=True),
    sa.Column('number_of_frames', sa.Integer(), nullable=False),
    sa.Column('image_position', sa.JSON(), nullable=True),
    sa.Column('image_orientation', sa.JSON(), nullable=True),
    sa.Column('acquisition_time', sa.String(length=32), nullable=False),
    sa.Column('content_time', sa.String(length=32), nullable=False),
    sa.Column('has_pixels', sa.Boolean(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['series_fk'], ['series.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_instances_series_fk'), 'instances', ['series_fk'], unique=False)
    op.create_index(op.f('ix_instances_sop_instance_uid'), 'instances', ['sop_instance_uid'], unique=True)

    op.create_table('sequences',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_fk', sa.Integer(), nullable=False),
    sa.Column('frame_refs', sa.JSON(), nullable=False),
    sa.Column('n_frames', sa.Integer(), nullable=False),
    sa.Column('order_key', sa.String(length=32), nullable=False),
    sa.Column('prior_study_uid', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['series_fk'], ['series.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_sequences_series_fk'), 'sequences', ['series_fk'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sequence_fk', sa.Integer(), nullable=False),
    sa.Column('state', sa.Enum('queued', 'running', 'retrying', 'succeeded', 'failed', 'not_processed', 'cancelled', name='jobstate', native_enum=False, length=32), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('model_name', sa.String(length=64), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('celery_task_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['sequence_fk'], ['sequences.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_jobs_created_at'), 'jobs', ['created_at'], unique=False)
    op.create_index(op.f('ix_jobs_sequence_fk'), 'jobs', ['sequence_fk'], unique=False)
    op.create_index(op.f('ix_jobs_state'), 'jobs', ['state'], unique=False)

    op.create_table('results',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_fk', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('is_anomaly', sa.Boolean(), nullable=False),
    sa.Column('cluster_label', sa.String(length=64), nullable=False),
    sa.Column('model_name', sa.String(length=64), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('sr_sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sc_sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('inference_seconds', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_fk'], ['jobs.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_results_job_fk'), 'results', ['job_fk'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('result_fk', sa.Integer(), nullable=True),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('destination', sa.String(length=128), nullable=False),
    sa.Column('state', sa.Enum('pending', 'sent', 'failed', name='outboxstate', native_enum=False, length=32), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['result_fk'], ['results.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_outbox_next_attempt_at'), 'outbox', ['next_attempt_at'], unique=False)
    op.create_index(op.f('ix_outbox_result_fk'), 'outbox', ['result_fk'], unique=False)
    op.create_index(op.f('ix_outbox_sop_instance_uid'), 'outbox', ['sop_instance_uid'], unique=True)
    op.create_index(op.f('ix_outbox_state'), 'outbox', ['state'], unique=False)



def downgrade() -> None:
    op.drop_index(op.f('ix_outbox_state'), table_name='outbox')
    op.drop_index(op.f('ix_outbox_sop_instance_uid'), table_name='outbox')
    op.drop_index(op.f('ix_outbox_result_fk'), table_name='outbox')
    op.drop_index(op.f('ix_outbox_next_attempt_at'), table_name='outbox')

    op.drop_table('outbox')
    op.drop_index(op.f('ix_results_job_fk'), table_name='results')

    op.drop_table('results')
    op.drop_index(op.f('ix_jobs_state'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_sequence_fk'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_created_at'), table_name='jobs')

    op.drop_table('jobs')
    op.drop_index(op.f('ix_sequences_series_fk'), table_name='sequences')

    op.drop_table('sequences')
    op.drop_index(op.f('ix_instances_sop_instance_uid'), table_name='instances')
    op.drop_index(op.f('ix_instances_series_fk'), table_name='instances')

    op.drop_table('instances')
    op.drop_index(op.f('ix_series_study_fk'), table_name='series')
    op.drop_index(op.f('ix_series_state'), table_name='series')
    op.drop_index(op.f('ix_series_series_uid'), table_name='series')
    op.drop_index(op.f('ix_series_last_received_at'), table_name='series')

    op.drop_table('series')
    op.drop_index(op.f('ix_studies_study_uid'), table_name='studies')
    op.drop_index(op.f('ix_studies_patient_fk'), table_name='studies')

    op.drop_table('studies')
    op.drop_table('quarantine')
    op.drop_index(op.f('ix_patients_patient_id'), table_name='patients')

    op.drop_table('patients')
