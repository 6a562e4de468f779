"""``medgru jobs list/show/retry/cancel`` through the real command line (settings from a TOML file)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pydicom
import pytest

from medgru.cli import main
from storage.models import Job, JobState
from tests.worker.conftest import BRAINIX, KNEE, add_series
from worker.models import ModelRegistry
from worker.pipeline import process_job

pytestmark = pytest.mark.integration  # PostgreSQL is a real peer


@pytest.fixture
def cli(worker_settings, tmp_path, cli_env):
    settings = worker_settings()
    toml = tmp_path / "medgru.toml"
    model = ", ".join(f'"{p.as_posix()}"' for p in settings.model)
    toml.write_text(f'home = "{settings.home.as_posix()}"\ndatabase_url = "{settings.database_url}"\n'
                    f'model = [{model}]\n')

    def run(*argv) -> int:
        return main(["--config", str(toml), "jobs", *argv])

    return settings, run


def _sr_uid(sf, job_id) -> str:
    from sqlalchemy import select

    from storage.models import Result

    with sf() as s:
        [uid] = s.scalars(select(Result.sr_sop_instance_uid).where(Result.job_fk == job_id)).all()
        return uid


def _state(sf, job_id) -> Job:
    with sf() as s:
        return s.get(Job, job_id)


def test_jobs_list_show_retry_cancel(cli, session_factory, dicom_corpus, capsys):
    settings, run = cli
    covered = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=2)
    uncovered = add_series(settings, session_factory, dicom_corpus, KNEE, body_part="KNEE", limit=1)
    registry = ModelRegistry.from_settings(settings)
    assert process_job(settings, session_factory, covered, registry) is JobState.SUCCEEDED
    assert process_job(settings, session_factory, uncovered, registry) is JobState.NOT_PROCESSED
    patient_name = str(pydicom.dcmread(dicom_corpus / BRAINIX / "IM-0001-0001.dcm", stop_before_pixels=True).PatientName)

    capsys.readouterr()
    assert run("list") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATE", "TRIES"]
    row = {ln.split()[0]: ln for ln in lines[2:]}
    assert "succeeded" in row[str(covered)] and "BRAIN" in row[str(covered)]
    assert ("normal" in row[str(covered)]) or ("abnormal" in row[str(covered)])
    assert "not_processed" in row[str(uncovered)] and "KNEE" in row[str(uncovered)]
    assert patient_name not in out and "BRAINIX" not in out.upper()

    brainix = pydicom.dcmread(dicom_corpus / BRAINIX / "IM-0001-0001.dcm", stop_before_pixels=True)
    for value in (brainix.StudyInstanceUID, brainix.SeriesInstanceUID, brainix.SOPInstanceUID):
        assert run("list", "--find", value) == 0
        assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[2:]] == [str(covered)], value
    assert run("list", "--find", "1.2.3.999") == 0
    assert "(no jobs)" in capsys.readouterr().out

    assert run("list", "--state", "not_processed") == 0
    out = capsys.readouterr().out
    ids = [ln.split()[0] for ln in out.splitlines()[2:]]
    assert ids == [str(uncovered)]

    assert run("show", str(uncovered)) == 0
    out = capsys.readouterr().out
    assert "no model covers modality MR, body part KNEE" in out and patient_name not in out
    assert run("show", str(covered)) == 0
    out = capsys.readouterr().out
    assert "SR UID" in out and "outbox" in out and "ORTHANC@127.0.0.1:4242" in out
    [frames] = [ln for ln in out.splitlines() if ln.startswith("frame scores")]
    assert "1: " in frames and "2: " in frames and "of 2 judged frames above the threshold" in frames

    # retry a not-processed job: QUEUED again, attempts reset, a message on the embedded broker
    queue_dir = settings.broker_dir / "queue"
    before = set(queue_dir.iterdir()) if queue_dir.is_dir() else set()
    assert run("retry", str(uncovered)) == 0
    assert "re-queued" in capsys.readouterr().out
    job = _state(session_factory, uncovered)
    assert job.state is JobState.QUEUED and job.attempts == 0 and job.reason == ""
    assert len(set(queue_dir.iterdir()) - before) == 1

    # a succeeded job is re-run only on purpose, a queued one can be cancelled, a cancelled one not again
    assert run("retry", str(covered)) == 1
    assert "--rerun re-runs a succeeded job" in capsys.readouterr().out
    first_sr = _sr_uid(session_factory, covered)
    assert run("retry", "--rerun", str(covered)) == 0
    assert _state(session_factory, covered).state is JobState.QUEUED
    assert process_job(settings, session_factory, covered, registry) is JobState.SUCCEEDED
    assert _sr_uid(session_factory, covered) == first_sr  # replaced, same model and version: same UID
    capsys.readouterr()
    assert run("cancel", str(uncovered)) == 0
    assert _state(session_factory, uncovered).state is JobState.CANCELLED
    assert run("cancel", str(uncovered)) == 1
    assert "cannot cancel" in capsys.readouterr().out
    # the worker later picks the message up and finds the job cancelled: a no-op
    assert process_job(settings, session_factory, uncovered, registry) is JobState.CANCELLED

    assert run("show", "9999") == 1
    assert run("retry", "9999") == 1

    # retention removed the files of the cancelled job: a retry is refused at once, naming the instance
    # and what to do, instead of queueing a job that can only fail
    from datetime import datetime, timezone

    from storage.models import Instance
    with session_factory() as s:
        [inst] = s.query(Instance).filter(Instance.sop_instance_uid == str(
            s.get(Job, uncovered).sequence.frame_refs[0][0])).all()
        inst.purged_at = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
        s.commit()
    capsys.readouterr()
    assert run("retry", str(uncovered)) == 1
    out = capsys.readouterr().out
    assert f"SOP Instance {inst.sop_instance_uid}" in out and "removed from the spool by retention on 2026-03-01" in out
    assert "send the series again" in out
    assert _state(session_factory, uncovered).state is JobState.CANCELLED


def test_jobs_retry_all_failed_after_an_outage(cli, session_factory, dicom_corpus, capsys):
    settings, run = cli
    jobs = [add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1),
            add_series(settings, session_factory, dicom_corpus, KNEE, body_part="KNEE", limit=1)]
    with session_factory() as s:  # a third job on the first sequence
        third = Job(sequence_fk=s.get(Job, jobs[0]).sequence_fk, state=JobState.QUEUED)
        s.add(third)
        s.commit()
        jobs.append(third.id)
    two_days_ago = datetime.now(timezone.utc) - timedelta(days=2)
    with session_factory() as s:  # two failed while the workers were away, two days ago; one succeeded
        for job_id, state in zip(jobs, (JobState.FAILED, JobState.FAILED, JobState.SUCCEEDED)):
            s.get(Job, job_id).state = state
            s.get(Job, job_id).last_error = "worker lost" if state is JobState.FAILED else ""
            s.get(Job, job_id).queued_at = s.get(Job, job_id).created_at = two_days_ago
        s.commit()
    queue_dir = settings.broker_dir / "queue"
    before = set(queue_dir.iterdir()) if queue_dir.is_dir() else set()
    capsys.readouterr()
    assert run("retry", "--all-failed") == 0
    out = capsys.readouterr().out
    assert f"job {jobs[0]} re-queued" in out and f"job {jobs[1]} re-queued" in out and str(jobs[2]) not in out
    assert [_state(session_factory, j).state for j in jobs] == [JobState.QUEUED, JobState.QUEUED,
                                                                 JobState.SUCCEEDED]
    assert len(set(queue_dir.iterdir()) - before) == 2  # one broker message each
    for job_id in jobs[:2]:  # queued now, for the oldest-waiting gauge; created when it was
        job = _state(session_factory, job_id)
        assert datetime.now(timezone.utc) - job.queued_at < timedelta(minutes=10)
        assert job.created_at == two_days_ago
    assert run("retry", "--all-failed") == 0
    assert "no failed jobs" in capsys.readouterr().out
    # several ids: the retryable ones go, the others are named, exit 1
    with session_factory() as s:
        s.get(Job, jobs[0]).state = JobState.FAILED
        s.commit()
    assert run("retry", str(jobs[0]), str(jobs[2])) == 1
    out = capsys.readouterr().out
    assert f"job {jobs[0]} re-queued" in out and "cannot retry" in out


def test_jobs_verdicts_by_model_and_sender(cli, session_factory, dicom_corpus, capsys):
    settings, run = cli
    capsys.readouterr()
    assert run("verdicts") == 0
    assert "no results yet" in capsys.readouterr().out
    job = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=2,
                     calling_ae="SITE_A")
    assert process_job(settings, session_factory, job, ModelRegistry.from_settings(settings)) is JobState.SUCCEEDED
    from storage.models import Result
    with session_factory() as s:
        [result] = s.query(Result).filter(Result.job_fk == job).all()
    abnormal = int(result.is_anomaly)
    capsys.readouterr()
    assert run("verdicts", "--recent", "5") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "VERSION", "SENDER"] and "LATEST 5: ABNORMAL" in lines[0]
    [row] = [ln for ln in lines if "SITE_A" in ln]
    assert row.split()[:4] == [result.model_name, result.model_version, "SITE_A", "1"]
    assert f"{abnormal} ({abnormal:.0%})" in row and f"{abnormal} of 1 ({abnormal:.0%})" in row
    assert run("verdicts", "--recent", "0") == 2


def test_jobs_list_find_names_a_series_received_without_a_job(cli, session_factory, capsys):
    """``medgru jobs list --find`` of a study whose series was set IGNORED said "(no jobs)" and nothing
    else: the assembler's reason was in the database only. It now lists such series with state and reason."""
    from storage.models import Instance, Patient, Series, SeriesState, Study

    _settings, run = cli
    with session_factory() as s:
        st = Study(study_uid="7.7.7", accession_number="ACC77", patient=Patient(patient_id="P7"))
        se = Series(series_uid="7.7.7.1", study=st, modality="MR", state=SeriesState.IGNORED,
                    state_reason="assembly failed: ValueError: bad")
        s.add(Instance(sop_instance_uid="7.7.7.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.4", series=se,
                       path="y.dcm", has_pixels=True))
        s.commit()
    capsys.readouterr()
    assert run("list", "--find", "7.7.7") == 0
    out = capsys.readouterr().out
    assert "(no jobs)" in out and "received without a job" in out
    (line,) = [ln for ln in out.splitlines() if "7.7.7.1" in ln]
    assert "ignored" in line and "assembly failed: ValueError: bad" in line
    assert run("list", "--find", "1.2.3.999") == 0
    assert "received without a job" not in capsys.readouterr().out
