"""Verdicts by model and sender (SQLite and PostgreSQL): counts, the share over the latest results, the
sender taken from the series' latest instance, and only a job's latest result counting."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from itertools import count

import pytest

from storage.models import Instance, Job, JobState, Patient, Result, SequenceRecord, Series, SeriesState, Study
from worker.monitoring import verdict_rows

pytestmark = pytest.mark.integration  # PostgreSQL is a real peer

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)
_uid = count(1)


def _job(session, sender: str, verdicts: list[bool], *, model=("medgru-svc-chest-cxr", "7.0.0"),
         at: datetime = T0, earlier_sender: str | None = None) -> None:
    """A series from ``sender`` (its latest instance; ``earlier_sender`` sent an earlier one) and one job
    whose results are ``verdicts`` in order (the last one is the job's latest)."""
    n = next(_uid)
    series = Series(series_uid=f"1.2.3.{n}", modality="CR", body_part="CHEST", state=SeriesState.ASSEMBLED,
                    study=Study(study_uid=f"1.2.4.{n}", patient=Patient(patient_id=f"P{n}", issuer="")))
    senders = ([earlier_sender] if earlier_sender is not None else []) + [sender]
    for i, ae in enumerate(senders):
        session.add(Instance(sop_instance_uid=f"1.2.5.{n}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                             series=series, path="x.dcm", calling_ae=ae, received_at=at + timedelta(seconds=i)))
    seq = SequenceRecord(series=series, frame_refs=[[f"1.2.5.{n}.0", 1]], n_frames=1)
    job = Job(sequence=seq, state=JobState.SUCCEEDED)
    session.add(job)
    session.flush()
    for i, abnormal in enumerate(verdicts):
        session.add(Result(job_fk=job.id, score=2.0 if abnormal else 0.5, threshold=1.0, is_anomaly=abnormal,
                           model_name=model[0], model_version=model[1], created_at=at + timedelta(minutes=i)))


def test_verdicts_by_model_and_sender(session_factory):
    with session_factory() as s:
        # SITE_A: six jobs, the last three ABNORMAL (the latest 3 are all abnormal)
        for i, abnormal in enumerate([False, False, False, True, True, True]):
            _job(s, "SITE_A", [abnormal], at=T0 + timedelta(hours=i))
        # SITE_B: a job first ABNORMAL, re-run NORMAL (only the latest result counts); its series' first
        # instance came from SITE_A, the latest from SITE_B
        _job(s, "SITE_B", [True, False], earlier_sender="SITE_A")
        # the brain model, no calling AE recorded
        _job(s, "", [True], model=("medgru-svc-brain-mr", "9.0.0"))
        s.commit()

    with session_factory() as s:
        rows = verdict_rows(s, recent=3)
    by_key = {(r.model, r.version, r.sender): r for r in rows}
    assert list(by_key) == [("medgru-svc-brain-mr", "9.0.0", ""), ("medgru-svc-chest-cxr", "7.0.0", "SITE_A"),
                            ("medgru-svc-chest-cxr", "7.0.0", "SITE_B")]
    a = by_key["medgru-svc-chest-cxr", "7.0.0", "SITE_A"]
    assert (a.results, a.abnormal, a.recent, a.recent_abnormal) == (6, 3, 3, 3)
    assert a.share == pytest.approx(0.5) and a.recent_share == pytest.approx(1.0)
    assert a.last_at.replace(tzinfo=timezone.utc) == T0 + timedelta(hours=5)
    b = by_key["medgru-svc-chest-cxr", "7.0.0", "SITE_B"]
    assert (b.results, b.abnormal, b.recent, b.recent_abnormal) == (1, 0, 1, 0)
    brain = by_key["medgru-svc-brain-mr", "9.0.0", ""]
    assert (brain.results, brain.abnormal) == (1, 1)
    assert brain.as_dict()["recent_share"] == 1.0

    with session_factory() as s:  # a window wider than the history covers all of it
        wide = {(r.model, r.sender): r for r in verdict_rows(s, recent=100)}
    assert wide["medgru-svc-chest-cxr", "SITE_A"].recent == 6
    with session_factory() as s, pytest.raises(ValueError, match="at least 1"):
        verdict_rows(s, recent=0)


def test_no_results_no_rows(session_factory):
    with session_factory() as s:
        assert verdict_rows(s) == []
