"""The queue sweeper of ``worker/tasks.py`` against a real database: orphaned RUNNING jobs."""

from __future__ import annotations

import base64
import json
import logging
import socket
from datetime import timedelta

import pytest

from storage.models import Job, JobState, utcnow
from tests.worker.conftest import BRAINIX, add_series
from worker.celery_app import make_celery
from worker.pipeline import claim_job
from worker.tasks import BrokerUnavailable, StalledJobSweeper, enqueue_job


def _queued_job_ids(settings) -> list[int]:
    ids = []
    for p in sorted((settings.broker_dir / "queue").glob("*.msg")):
        ids.append(json.loads(base64.b64decode(json.loads(p.read_text())["body"]))[1]["job_id"])
    return sorted(ids)


def test_a_running_job_whose_worker_is_gone_is_queued_again(make_settings, db_url, session_factory, dicom_corpus):
    """Production layout (external workers): a worker killed mid-job (kill -9, out of memory) left its job
    RUNNING until Redis re-delivered the message after its 3 h visibility timeout, and for ever when Redis
    had lost the message (a restart without persistence); nothing re-queued it and `medgru jobs retry` /
    `cancel` refuse a RUNNING job. Now the sweep queues again a RUNNING job whose worker has not stamped it
    for job_stale_after_s, and fails one that has used all its attempts."""
    settings = make_settings(database_url=db_url, job_max_retries=2, job_heartbeat_s=30.0,
                             job_stale_after_s=300.0, requeue_after_s=300.0)
    t0 = utcnow()
    orphan = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    with session_factory() as s:
        job = s.get(Job, orphan)
        job.state, job.attempts, job.started_at, job.heartbeat_at = JobState.RUNNING, 1, t0, t0
        job.celery_task_id = "task-of-the-killed-worker"
        seq = job.sequence_fk
        alive = Job(sequence_fk=seq, state=JobState.RUNNING, attempts=1, started_at=t0 - timedelta(hours=1),
                    heartbeat_at=t0 + timedelta(seconds=250), celery_task_id="task-of-a-live-worker")
        killer = Job(sequence_fk=seq, state=JobState.RUNNING, attempts=3, started_at=t0, heartbeat_at=t0,
                     celery_task_id="task-that-kills-its-worker")
        legacy = Job(sequence_fk=seq, state=JobState.RUNNING, attempts=1, started_at=t0)  # before 0009
        s.add_all([alive, killer, legacy])
        s.commit()
        alive, killer, legacy = alive.id, killer.id, legacy.id
    sweeper = StalledJobSweeper(settings, session_factory, make_celery(settings, queue="medgru.orphans"))

    assert sweeper.sweep(now=t0 + timedelta(seconds=299)) == []  # not silent for long enough yet
    assert _queued_job_ids(settings) == []
    assert sweeper.sweep(now=t0 + timedelta(seconds=301)) == [orphan, legacy]
    assert _queued_job_ids(settings) == [orphan, legacy]  # one message each, at once
    assert sweeper.sweep(now=t0 + timedelta(seconds=302)) == []  # not doubled at the next sweep
    with session_factory() as s:
        o, a, k = s.get(Job, orphan), s.get(Job, alive), s.get(Job, killer)
        assert (o.state, o.attempts, o.celery_task_id) == (JobState.QUEUED, 1, "")
        assert "no sign of life for 301 s" in o.last_error
        assert a.state is JobState.RUNNING and a.celery_task_id == "task-of-a-live-worker"
        assert k.state is JobState.FAILED and "stopped during each of its 3 attempts" in k.last_error
        assert s.get(Job, legacy).state is JobState.QUEUED
    # the next delivery runs it (attempt 2); the killed worker's message, re-delivered hours later, finds
    # another task's claim and does nothing
    assert claim_job(session_factory, orphan, task_id="new-task", max_retries=2) == (True, JobState.RUNNING)
    assert claim_job(session_factory, orphan, task_id="task-of-the-killed-worker",
                     max_retries=2) == (False, JobState.RUNNING)
    with session_factory() as s:
        assert s.get(Job, orphan).attempts == 2


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_broker_outage_is_one_line_naming_the_broker(make_settings, db_url, session_factory, dicom_corpus,
                                                       caplog):
    """Redis away: enqueue_job raised kombu's OperationalError, logged by the sweeper (and the assembler)
    with a 170-line chained traceback at every sweep. Now a BrokerUnavailable (a ConnectionError) naming the
    broker, password masked, and the sweep logs one line."""
    settings = make_settings(database_url=db_url, broker_url=f"redis://:s3cret@127.0.0.1:{_closed_port()}/0",
                             requeue_after_s=0.0)
    app = make_celery(settings, queue="medgru.away")
    with pytest.raises(BrokerUnavailable, match=r"broker redis://:\*\*@127\.0\.0\.1:\d+/0 did not take job 7"):
        enqueue_job(app, 7)
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    sweeper = StalledJobSweeper(settings, session_factory, app)
    with caplog.at_level(logging.ERROR, logger="worker.tasks"):
        assert sweeper.sweep() == []
    [record] = [r for r in caplog.records if "could not be enqueued again" in r.getMessage()]
    assert record.getMessage().startswith(f"job {job_id}: could not be enqueued again (broker redis://:**@")
    assert record.exc_info is None and "s3cret" not in record.getMessage()


def test_a_job_its_worker_finishes_during_the_reclaim_stays_finished(make_settings, tmp_path, dicom_corpus):
    """On SQLite (the embedded default) the reclaim read the job, found it RUNNING and silent, and wrote
    QUEUED with a plain ORM update: FOR UPDATE is a no-op there and the driver opens no transaction for a
    SELECT, so a worker that recorded SUCCEEDED in between (its heartbeat was late, not gone) had its
    finished job queued again and run a second time, its objects sent again. The reclaim is now one
    conditional UPDATE (still RUNNING, still silent), as retry and cancel are."""
    from sqlalchemy import event

    import worker.pipeline as pipeline
    from storage.db import init_db, make_session_factory

    engine = init_db(f"sqlite:///{tmp_path / 'reclaim.sqlite3'}")
    sf = make_session_factory(engine)
    settings = make_settings(database_url=str(engine.url), job_heartbeat_s=30.0, job_stale_after_s=300.0)
    t0 = utcnow()
    job_id = add_series(settings, sf, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    with sf() as s:
        job = s.get(Job, job_id)
        job.state, job.attempts, job.started_at, job.heartbeat_at = JobState.RUNNING, 1, t0, t0
        job.celery_task_id = "task-of-a-late-worker"
        s.commit()
    finished = []

    def worker_finishes_first(conn, cursor, statement, params, context, executemany):
        if finished or not statement.lstrip().upper().startswith("UPDATE JOBS"):
            return
        finished.append(True)  # just before the sweeper writes: the worker's own connection records SUCCEEDED
        with sf() as other:
            assert pipeline._finish(other, job_id, JobState.SUCCEEDED, claim="task-of-a-late-worker")[1]
            other.commit()

    sweeper = StalledJobSweeper(settings, sf, make_celery(settings, queue="medgru.reclaim-race"))
    event.listen(engine, "before_cursor_execute", worker_finishes_first)
    assert sweeper.reclaim_orphans(now=t0 + timedelta(seconds=301)) == []
    event.remove(engine, "before_cursor_execute", worker_finishes_first)
    assert finished == [True]
    with sf() as s:
        job = s.get(Job, job_id)
        assert (job.state, job.celery_task_id) == (JobState.SUCCEEDED, "task-of-a-late-worker")
    engine.dispose()


def test_a_worker_runs_no_job_on_a_database_of_another_schema(make_settings, db_url, session_factory, dicom_corpus):
    """Upgrading the production layout: a worker of the new release started before the upgraded `medgru serve`
    had migrated the database failed every job with the driver's 'column jobs.heartbeat_at does not exist',
    retried for ever; a worker of an older release than the database ran jobs with the older code without a
    word. Now the task says which schema it found and what to do, and the job waits (QUEUED, no attempt)."""
    from sqlalchemy import text

    from storage.db import downgrade_db, head_revision, init_db
    from worker.tasks import SchemaNotAtRelease, run_job, worker_context

    settings = make_settings(database_url=db_url, job_max_retries=2)
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    app = make_celery(settings, queue="medgru.schema")
    task = app.tasks[run_job.name]
    downgrade_db(db_url, "0007")  # the release before: no jobs.heartbeat_at
    with pytest.raises(SchemaNotAtRelease, match=rf"at revision 0007, this worker's release needs "
                                                 rf"{head_revision()}: start the upgraded `medgru serve`"):
        task(job_id=job_id)
    init_db(db_url).dispose()
    with worker_context(app).engine.begin() as conn:  # what a newer release leaves
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(SchemaNotAtRelease, match="at revision 0099.*a newer release migrated it"):
        task(job_id=job_id)
    with session_factory() as s:
        job = s.get(Job, job_id)
        assert job.state is JobState.QUEUED and job.attempts == 0
