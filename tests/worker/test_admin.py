"""Admin actions on jobs (:mod:`worker.admin`) racing a worker or a second admin."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage.db import init_db, make_session_factory
from storage.models import Job, JobState, Patient, SequenceRecord, Series, Study
from worker.admin import cancel_job, retry_job
from worker.celery_app import make_celery
from worker.pipeline import claim_job


def _job(sf, state: JobState) -> int:
    n = uuid.uuid4().int % 10**12  # the PostgreSQL database is shared by the session's tests
    with sf() as s:
        st = Study(study_uid=f"1.2.3.{n}", patient=Patient(patient_id=f"P{n}"))
        seq = SequenceRecord(series=Series(series_uid=f"1.2.3.4.{n}", study=st, modality="MR", body_part="BRAIN"),
                             frame_refs=[[f"1.2.3.4.{n}.1", 1]], n_frames=1)
        job = Job(sequence=seq, state=state)
        s.add(job)
        s.commit()
        return job.id


def _racing(sf, meanwhile) -> sessionmaker:
    """A session factory on the same database whose sessions run ``meanwhile()`` (in another session) right
    after they first read a job: what a worker or a second admin does between the read and the write."""
    done = []

    class Racing(Session):
        def get(self, *args, **kwargs):
            obj = super().get(*args, **kwargs)
            if not done:
                done.append(True)
                meanwhile()
            return obj

    return sessionmaker(bind=sf.kw["bind"], class_=Racing, expire_on_commit=False)


def test_a_cancel_does_not_overwrite_a_job_a_worker_claimed_meanwhile(make_settings, database_url):
    """cancel_job read the job QUEUED, a worker claimed it (RUNNING), and the cancel wrote CANCELLED over it:
    the admin was told the job was cancelled while it ran and its results went to the PACS (PostgreSQL;
    SQLite raised 'database is locked'). Now the cancel is refused, naming the state the job is in."""
    settings = make_settings(database_url=database_url)
    sf = make_session_factory(init_db(settings.effective_database_url))
    job_id = _job(sf, JobState.QUEUED)
    with pytest.raises(ValueError, match="is running"):
        cancel_job(_racing(sf, lambda: claim_job(sf, job_id)), job_id)
    with sf() as s:
        assert s.get(Job, job_id).state is JobState.RUNNING


def test_two_retries_of_one_job_queue_it_once(make_settings, database_url, monkeypatch):
    """Two Retry clicks (two admins, a double click) both read the job FAILED and both re-queued it; the
    second is refused now, and the job is enqueued once."""
    settings = make_settings(database_url=database_url)
    sf = make_session_factory(init_db(settings.effective_database_url))
    job_id = _job(sf, JobState.FAILED)
    enqueued = []
    monkeypatch.setattr("worker.tasks.enqueue_job", lambda app, jid: enqueued.append(jid))
    app = make_celery(settings)
    with pytest.raises(ValueError, match="is queued"):
        retry_job(_racing(sf, lambda: retry_job(sf, app, job_id)), app, job_id)
    assert enqueued == [job_id]
    with sf() as s:
        assert s.get(Job, job_id).state is JobState.QUEUED


def test_job_fields_show_the_assembly_note_of_the_job_s_sequence(make_settings, database_url):
    """What the assembler noted on a series' sequence (the images it left out of it, a localizer of another
    plane) was kept in series.state_reason only, which neither ``medgru jobs show`` nor the job page
    showed. The series' latest job shows it; an older job of the series (an earlier sequence, before a late
    slice) does not show a note that is not about its frames."""
    from worker.admin import job_fields

    settings = make_settings(database_url=database_url)
    sf = make_session_factory(init_db(settings.effective_database_url))
    n = uuid.uuid4().int % 10**12
    note = "5 frames ordered by instance_number; 1 image(s) left out, their slice orientation not the stack's"
    with sf() as s:
        series = Series(series_uid=f"1.2.3.4.{n}", study=Study(study_uid=f"1.2.3.{n}", patient=Patient(
            patient_id=f"P{n}")), modality="MR", body_part="BRAIN", state_reason=note)
        old = Job(sequence=SequenceRecord(series=series, frame_refs=[[f"1.2.3.4.{n}.1", 1]], n_frames=1),
                  state=JobState.SUCCEEDED)
        s.add(old)
        s.flush()
        new = Job(sequence=SequenceRecord(series=series, frame_refs=[[f"1.2.3.4.{n}.1", 1]], n_frames=1),
                  state=JobState.QUEUED)
        s.add(new)
        s.commit()
        old_id, new_id = old.id, new.id
    with sf() as s:
        assert dict(job_fields(s, new_id))["assembly"] == note
        assert "assembly" not in dict(job_fields(s, old_id))
