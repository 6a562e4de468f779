"""Constraints and types of the models hold on SQLite and PostgreSQL (schema built by the migrations)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from storage.db import init_db, make_session_factory
from storage.models import (
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Patient,
    Result,
    SequenceRecord,
    Series,
    SeriesState,
    Study,
)
from tests.storage.dbutil import isolated_url


@pytest.fixture
def session_factory(database_url):
    with isolated_url(database_url) as url:
        engine = init_db(url)
        try:
            yield make_session_factory(engine)
        finally:
            engine.dispose()


def _series(s, uid="1.2.3.1") -> Series:
    patient = Patient(patient_id="P1")
    study = Study(study_uid=uid + ".0", patient=patient)
    series = Series(series_uid=uid, study=study, modality="MR")
    s.add(series)
    s.flush()
    return series


def _instance(series: Series, uid: str) -> Instance:
    return Instance(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", series=series, path=f"{uid}.dcm")


def test_resent_sop_instance_uid_cannot_be_stored_twice(session_factory):
    with session_factory() as s:
        series = _series(s)
        s.add(_instance(series, "1.2.3.1.1"))
        s.commit()
    with session_factory() as s:
        series = s.scalar(select(Series))
        s.add(_instance(series, "1.2.3.1.1"))
        with pytest.raises(IntegrityError):
            s.commit()
        s.rollback()
        assert s.scalar(select(text("count(*)")).select_from(Instance)) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: [Patient(patient_id="P", issuer="X"), Patient(patient_id="P", issuer="X")],
        lambda: [Study(study_uid="9.9", patient=Patient(patient_id="A")),
                 Study(study_uid="9.9", patient=Patient(patient_id="B"))],
        lambda: [OutboxItem(path="a", sop_instance_uid="8.8", sop_class_uid="1.2", destination="A@h:1"),
                 OutboxItem(path="b", sop_instance_uid="8.8", sop_class_uid="1.2", destination="A@h:1")],
    ],
    ids=["patient_id+issuer", "study_uid", "outbox_sop_instance_uid"],
)
def test_other_unique_constraints(session_factory, make):
    with session_factory() as s:
        first, second = make()
        s.add(first)
        s.commit()
        s.add(second)
        with pytest.raises(IntegrityError):
            s.commit()


def test_same_patient_id_with_other_issuer_is_another_patient(session_factory):
    with session_factory() as s:
        s.add_all([Patient(patient_id="P", issuer="X"), Patient(patient_id="P", issuer="Y")])
        s.commit()
        assert len(s.scalars(select(Patient)).all()) == 2


def test_enum_columns_round_trip_and_store_their_values(session_factory):
    with session_factory() as s:
        series = _series(s)
        seq = SequenceRecord(series=series, frame_refs=[["1.2.3.1.1", 1]], n_frames=1)
        s.add(seq)
        for i, state in enumerate(JobState):
            s.add(Job(sequence=seq, state=state, celery_task_id=f"t{i}"))
        for i, state in enumerate(OutboxState):
            s.add(OutboxItem(path=f"{i}", sop_instance_uid=f"7.{i}", sop_class_uid="1.2", destination="A@h:1",
                             state=state))
        s.commit()
    for state in SeriesState:
        with session_factory() as s:
            series = s.scalar(select(Series))
            series.state = state
            s.commit()
        with session_factory() as s:
            assert s.scalar(select(Series.state)) is state
            assert s.execute(text("SELECT state FROM series")).scalar_one() == state.value
    with session_factory() as s:
        jobs = s.scalars(select(Job).order_by(Job.id)).all()
        assert [j.state for j in jobs] == list(JobState)
        assert all(isinstance(j.state, JobState) for j in jobs)
        raw = s.execute(text("SELECT state FROM jobs ORDER BY id")).scalars().all()
        assert raw == [m.value for m in JobState]
        assert [o.state for o in s.scalars(select(OutboxItem).order_by(OutboxItem.id))] == list(OutboxState)
        assert s.scalar(select(Job).where(Job.state == JobState.NOT_PROCESSED)).celery_task_id == "t5"


def test_timezone_aware_datetimes_round_trip(session_factory):
    plus2 = timezone(timedelta(hours=2))
    when = datetime(2026, 3, 4, 12, 30, 15, 123456, tzinfo=plus2)
    with session_factory() as s:
        series = _series(s)
        series.last_received_at = when
        series.first_received_at = datetime(2026, 3, 4, 9, 0, 0)  # naive: taken as UTC
        s.commit()
    with session_factory() as s:
        got = s.scalar(select(Series))
        assert got.last_received_at == when
        assert got.last_received_at.utcoffset() == timedelta(0)
        assert got.last_received_at.hour == 10  # 12:30+02:00 is 10:30 UTC, not 12:30
        assert got.first_received_at == datetime(2026, 3, 4, 9, 0, 0, tzinfo=timezone.utc)
        # comparisons in SQL are between instants, whatever zone the bound value is in
        cutoff_just_after = datetime(2026, 3, 4, 10, 30, 16, tzinfo=timezone.utc)
        cutoff_just_before = datetime(2026, 3, 4, 5, 30, 14, tzinfo=timezone(timedelta(hours=-5)))
        assert s.scalar(select(Series.id).where(Series.last_received_at < cutoff_just_after)) == got.id
        assert s.scalar(select(Series.id).where(Series.last_received_at < cutoff_just_before)) is None


def test_defaults_are_aware(session_factory):
    with session_factory() as s:
        _series(s)
        s.commit()
    with session_factory() as s:
        series = s.scalar(select(Series))
        assert series.first_received_at.tzinfo is not None
        assert series.last_received_at.utcoffset() == timedelta(0)
        assert abs(datetime.now(timezone.utc) - series.last_received_at) < timedelta(hours=1)


def test_an_instance_of_2_gib_or_more_keeps_its_size(session_factory):
    """Whole-slide and long multi-frame files reach 2 GiB: a 32-bit column refused them on PostgreSQL (and
    the listener then quarantined every such instance)."""
    size = 5 * 2**30
    with session_factory() as s:
        series = _series(s)
        inst = _instance(series, "1.2.3.1.1")
        inst.size_bytes = size
        s.add(inst)
        s.commit()
    with session_factory() as s:
        assert s.scalar(select(Instance.size_bytes)) == size


def test_a_long_cluster_label_is_kept_whole(session_factory):
    """A detector's cluster label has no length limit (the SR codes a long one): with results.cluster_label a
    VARCHAR(64), PostgreSQL refused the INSERT and failed the job after its SR and SC were written."""
    label = "consolidation with air bronchograms, right lower lobe, likely infective; " * 4
    with session_factory() as s:
        seq = SequenceRecord(series=_series(s), frame_refs=[["1.2.3.1.1", 1]], n_frames=1)
        s.add(Result(job=Job(sequence=seq, state=JobState.SUCCEEDED), score=2.0, threshold=1.0, is_anomaly=True,
                     cluster_label=label, model_name="m", model_version="1"))
        s.commit()
    with session_factory() as s:
        assert s.scalar(select(Result.cluster_label)) == label


def test_the_start_up_log_line_never_shows_a_database_password(postgres_url, caplog):
    """libpq takes the password as a query parameter too; the log line of init_db showed it (a review
    helper's case). The trust-auth test server ignores the password."""
    import logging

    from storage.db import init_db

    url = f"{postgres_url}?password=DbS3cret-in-query"
    with caplog.at_level(logging.INFO, logger="storage.db"):
        init_db(url).dispose()
    lines = [r.getMessage() for r in caplog.records if "schema at head" in r.getMessage()]
    assert lines and "DbS3cret" not in " ".join(lines)
