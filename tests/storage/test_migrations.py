"""Alembic migrations on SQLite and PostgreSQL: schema equals the models, idempotent, reversible,
safe when several processes initialise the same database at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from storage.db import MIGRATIONS_DIR, alembic_config, downgrade_db, init_db, make_engine, make_session_factory
from storage.models import Base, Instance, Job, OutboxItem, Patient, Result, SequenceRecord, Series, Study, utcnow
from tests.storage.dbutil import isolated_url

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db_url(database_url):
    with isolated_url(database_url) as url:
        yield url


def _diff(engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(ctx, Base.metadata)


def _head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _current(engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_single_head_and_packaged_files():
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    assert (MIGRATIONS_DIR / "env.py").is_file() and (MIGRATIONS_DIR / "script.py.mako").is_file()


def test_upgrade_gives_exactly_the_models_schema(db_url):
    engine = init_db(db_url)
    try:
        assert _diff(engine) == []
        tables = set(inspect(engine).get_table_names())
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
        assert _current(engine) == _head()
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_and_keeps_data(db_url):
    engine = init_db(db_url)
    with make_session_factory(engine)() as s:
        s.add(Patient(patient_id="P1"))
        s.commit()
    engine.dispose()
    engine = init_db(db_url)  # second start of the service
    try:
        assert _current(engine) == _head()
        assert _diff(engine) == []
        with make_session_factory(engine)() as s:
            assert s.scalars(select(Patient.patient_id)).all() == ["P1"]
    finally:
        engine.dispose()


def test_downgrade_to_base_and_back(db_url):
    init_db(db_url).dispose()
    downgrade_db(db_url, "base")
    engine = init_db(db_url)
    try:
        assert _diff(engine) == []
    finally:
        engine.dispose()
    downgrade_db(db_url, "base")
    engine = make_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert _current(engine) is None
    finally:
        engine.dispose()


def test_concurrent_init_from_several_processes(db_url):
    """The serve process and workers start together: each calls init_db, none fails, schema is right."""
    code = (
        "import sys; from storage.db import init_db; "
        "e = init_db(sys.argv[1]); e.dispose(); print('ok')"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, db_url], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate() for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip() == "ok"
    engine = init_db(db_url)
    try:
        assert _diff(engine) == []
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    finally:
        engine.dispose()


def test_upgrade_from_0005_keeps_rows_and_widens_columns(db_url):
    """0006 widens instances.size_bytes to 64 bits and results.cluster_label to text in place: the rows of a
    database at 0005 stay, and then take sizes over 2 GiB and labels over 64 characters."""
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0005")
            with Session(bind=conn) as s:  # the 0005 tables hold every column the models write here
                series = Series(series_uid="1.2.3", study=Study(study_uid="1.2", patient=Patient(patient_id="P1")),
                                modality="MR")
                s.add(series)
                s.flush()
                # the instances row in SQL: the model has columns of later revisions (patient_fk, 0009)
                conn.execute(text("INSERT INTO instances (sop_instance_uid, sop_class_uid, series_fk, "
                                  "transfer_syntax_uid, number_of_frames, acquisition_time, content_time, has_pixels, "
                                  "path, size_bytes, sha256, calling_ae, received_at) VALUES ('1.2.3.4', "
                                  "'1.2.840.10008.5.1.4.1.1.4', :series, '', 1, '', '', false, 'a.dcm', 1000, '', '', "
                                  ":t)"), {"series": series.id, "t": utcnow()})
                seq = SequenceRecord(series=series, frame_refs=[["1.2.3.4", 1]], n_frames=1)
                s.add(seq)
                s.flush()
                # the jobs row in SQL: the model has columns of later revisions (queued_at, 0007)
                conn.execute(text("INSERT INTO jobs (sequence_fk, state, attempts, last_error, reason, model_name, "
                                  "model_version, celery_task_id, created_at) VALUES (:seq, 'queued', 0, '', '', '', "
                                  "'', '', :t)"), {"seq": seq.id, "t": utcnow()})
                job_id = conn.execute(text("SELECT id FROM jobs")).scalar_one()
                result = Result(job_fk=job_id, score=2.0, threshold=1.0, is_anomaly=True,
                                cluster_label="short", model_name="m", model_version="1")
                s.add(result)
                s.flush()
                # an outbox row refers to the result: SQLite's copy of the results table must drop the original
                # (in SQL: the model has columns of later revisions, refusals of 0008)
                conn.execute(text("INSERT INTO outbox (result_fk, path, sop_instance_uid, sop_class_uid, destination, "
                                  "state, attempts, next_attempt_at, last_error, created_at) VALUES (:r, 'sr.dcm', "
                                  "'1.2.9', '1.2', 'A@h:1', 'pending', 3, :t, '', :t)"), {"r": result.id, "t": utcnow()})
    finally:
        engine.dispose()
    engine = init_db(db_url)
    try:
        assert _current(engine) == _head() and _diff(engine) == []
        if engine.dialect.name == "sqlite":  # unenforced only while the migration copied tables
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        with make_session_factory(engine)() as s:
            inst = s.scalars(select(Instance)).one()
            assert (inst.sop_instance_uid, inst.size_bytes) == ("1.2.3.4", 1000)
            assert inst.patient_fk == s.scalar(select(Patient.id).where(Patient.patient_id == "P1"))  # 0009
            inst.size_bytes = 5 * 2**30
            result = s.scalars(select(Result)).one()
            assert result.cluster_label == "short"
            result.cluster_label = "x" * 300
            s.commit()
        with make_session_factory(engine)() as s:
            assert s.scalar(select(Instance.size_bytes)) == 5 * 2**30
            assert s.scalar(select(Result.cluster_label)) == "x" * 300
    finally:
        engine.dispose()


def test_upgrade_to_0007_leaves_queued_at_empty_for_old_jobs(db_url):
    """0007 adds jobs.queued_at; a job from before it keeps none, and its created_at stands in (the
    oldest-waiting gauge reads coalesce(queued_at, created_at))."""
    from sqlalchemy import func

    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0006")
            assert "queued_at" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
            with Session(bind=conn) as s:
                series = Series(series_uid="1.2.3", study=Study(study_uid="1.2", patient=Patient(patient_id="P1")),
                                modality="MR")
                seq = SequenceRecord(series=series, frame_refs=[], n_frames=0)
                s.add(seq)
                s.flush()
                conn.execute(text("INSERT INTO jobs (sequence_fk, state, attempts, last_error, reason, model_name, "
                                  "model_version, celery_task_id, created_at) VALUES (:seq, 'queued', 0, '', '', '', "
                                  "'', '', :t)"), {"seq": seq.id, "t": utcnow()})
    finally:
        engine.dispose()
    engine = init_db(db_url)
    try:
        assert _current(engine) == _head() and _diff(engine) == []
        with make_session_factory(engine)() as s:
            job = s.scalars(select(Job)).one()
            assert job.queued_at is None
            assert s.scalar(select(func.min(func.coalesce(Job.queued_at, Job.created_at)))) == job.created_at
    finally:
        engine.dispose()


def test_upgrade_to_0008_starts_old_outbox_rows_with_no_refusals(db_url):
    """0008 adds outbox.refusals (only the peer's refusals count towards an item's max_attempts); a row from
    before it keeps its attempts and starts with 0 refusals."""
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0007")
            assert "refusals" not in {c["name"] for c in inspect(conn).get_columns("outbox")}
            conn.execute(text("INSERT INTO outbox (path, sop_instance_uid, sop_class_uid, destination, state, attempts, "
                              "next_attempt_at, last_error, created_at) VALUES ('sr.dcm', '1.2.9', '1.2', 'A@h:1', "
                              "'pending', 22, :t, '', :t)"), {"t": utcnow()})
    finally:
        engine.dispose()
    engine = init_db(db_url)
    try:
        assert _current(engine) == _head() and _diff(engine) == []
        with make_session_factory(engine)() as s:
            item = s.scalars(select(OutboxItem)).one()
            assert (item.attempts, item.refusals) == (22, 0)
    finally:
        engine.dispose()


def test_upgrade_to_0009_gives_old_instances_their_study_s_patient(db_url):
    """0009 adds instances.patient_fk (the patient each instance names); rows from before it take their
    study's patient, which the prior-study lookup assumed until then."""
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0008")
            now = {"t": utcnow()}
            conn.execute(text("INSERT INTO patients (id, patient_id, issuer, created_at) VALUES (7, 'P7', '', :t)"), now)
            conn.execute(text("INSERT INTO studies (id, study_uid, patient_fk, study_date, study_time, "
                              "accession_number, created_at) VALUES (3, '1.2.3', 7, '', '', '', :t)"), now)
            conn.execute(text("INSERT INTO series (id, series_uid, study_fk, modality, body_part, series_description, "
                              "state, state_reason, first_received_at, last_received_at) VALUES (5, '1.2.3.4', 3, 'MR', "
                              "'', '', 'assembled', '', :t, :t)"), now)
            conn.execute(text("INSERT INTO instances (sop_instance_uid, sop_class_uid, series_fk, transfer_syntax_uid, "
                              "number_of_frames, acquisition_time, content_time, has_pixels, path, size_bytes, sha256, "
                              "calling_ae, received_at) VALUES ('1.2.3.4.5', '1.2', 5, '', 1, '', '', true, 'a.dcm', 1, "
                              "'', '', :t)"), now)
    finally:
        engine.dispose()
    engine = init_db(db_url)
    try:
        assert _current(engine) == _head() and _diff(engine) == []
        with make_session_factory(engine)() as s:
            assert s.scalars(select(Instance)).one().patient_fk == 7
    finally:
        engine.dispose()


def test_upgrade_to_0010_leaves_heartbeat_at_empty_for_old_jobs(db_url):
    """0010 adds jobs.heartbeat_at (the worker's sign of life on a RUNNING job); a job from before it keeps
    none, and the sweeper reads its started_at instead."""
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0009")
            assert "heartbeat_at" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
    finally:
        engine.dispose()
    engine = init_db(db_url)
    try:
        assert _current(engine) == _head() == "0010" and _diff(engine) == []
        assert "heartbeat_at" in {c["name"] for c in inspect(engine).get_columns("jobs")}
    finally:
        engine.dispose()
