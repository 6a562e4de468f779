"""A real Celery worker (child process, ``worker.embedded.start_worker``) on both transports.

* embedded: kombu's filesystem transport under the settings' home, SQLite database;
* Redis at 127.0.0.1:6379 (a dedicated database number and a queue of the test's own), PostgreSQL.

Each test enqueues jobs with ``enqueue_job`` and polls the database (bounded, generous) until the worker
has moved them to their final state.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from storage.models import Job, JobState, OutboxItem, Result
from tests.conftest import REDIS_URL
from tests.worker.conftest import BRAINIX, KNEE, add_series
from worker.celery_app import make_celery
from worker.embedded import recover_orphans, start_worker
from worker.tasks import enqueue_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WAIT_S = 420.0  # generous: the worker imports torch and loads the model on a busy shared machine
REDIS_DB = 13  # dedicated to these tests; each test also uses a queue of its own


def _wait_states(session_factory, job_ids, done, timeout=WAIT_S, worker=None) -> dict[int, JobState]:
    deadline = time.monotonic() + timeout
    while True:
        with session_factory() as s:
            states = {j: s.get(Job, j).state for j in job_ids}
        if all(states[j] in done[j] for j in job_ids) or time.monotonic() > deadline:
            return states
        if worker is not None and not worker.is_alive():
            log = worker.log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"the worker process died:\n{log}")
        time.sleep(0.5)


def _worker_log(worker) -> str:
    return worker.log_path.read_text(errors="replace")[-4000:] if worker.log_path.is_file() else ""


def _redis_url() -> str:
    return REDIS_URL.rsplit("/", 1)[0] + f"/{REDIS_DB}"


def _run_scenario(settings, session_factory, dicom_corpus, queue):
    """Good, uncovered and failing jobs through a real worker; plus a job orphaned in RUNNING.

    The orphan is recovered at start-up, as ``medgru serve`` does, while it is the only unfinished job:
    recover_orphans re-enqueues every unfinished job, so calling it after the fresh jobs were enqueued
    would give each of them a second message (the failing job's second attempt then ran early and its
    pending retry message was handed back to the queue at shutdown: a flaky leftover)."""
    # a job a crashed worker left RUNNING (its message gone): only recover_orphans finds it
    orphan = add_series(settings, session_factory, dicom_corpus, "dcm_qa_nih/20180918GE/mr_0004",
                        body_part="BRAIN", limit=3)
    with session_factory() as s:
        job = s.get(Job, orphan)
        job.state, job.attempts, job.celery_task_id = JobState.RUNNING, 1, "lost-task"
        s.commit()
    app = make_celery(settings, queue=queue)
    worker = start_worker(settings, queue=queue)
    try:
        assert recover_orphans(session_factory, app) == [orphan]
        good = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=4)
        uncovered = add_series(settings, session_factory, dicom_corpus, KNEE, body_part="KNEE", limit=2)
        bad = add_series(settings, session_factory, dicom_corpus,
                         "pydicom/test_files/dicomdirtests/98892003/MR700", body_part="HEAD", limit=2)
        with session_factory() as s:  # a real failure: one of its spool files is truncated
            from storage.models import Instance, SequenceRecord

            seq = s.get(SequenceRecord, s.get(Job, bad).sequence_fk)
            uid = seq.frame_refs[0][0]
            inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
            victim = settings.spool_dir / inst.path
        victim.write_bytes(victim.read_bytes()[:300])
        for job_id in (good, uncovered, bad):
            enqueue_job(app, job_id)
        done = {good: {JobState.SUCCEEDED, JobState.FAILED}, uncovered: {JobState.NOT_PROCESSED, JobState.FAILED},
                bad: {JobState.FAILED}, orphan: {JobState.SUCCEEDED, JobState.FAILED}}
        states = _wait_states(session_factory, list(done), done, worker=worker)
        assert states == {good: JobState.SUCCEEDED, uncovered: JobState.NOT_PROCESSED, bad: JobState.FAILED,
                          orphan: JobState.SUCCEEDED}, _worker_log(worker)
    finally:
        code = worker.stop(timeout=60)
    assert code is not None and not worker.is_alive()

    with session_factory() as s:
        g, b, u, o = (s.get(Job, j) for j in (good, bad, uncovered, orphan))
        assert g.attempts == 1 and g.celery_task_id
        res = s.scalars(select(Result).where(Result.job_fk == good)).one()
        items = s.scalars(select(OutboxItem).where(OutboxItem.result_fk == res.id)).all()
        assert {i.sop_instance_uid for i in items} == {res.sr_sop_instance_uid, res.sc_sop_instance_uid}
        assert all((settings.outbox_dir / i.path).is_file() for i in items)
        assert b.attempts == settings.job_max_retries + 1 and uid in b.last_error
        assert u.reason == "no model covers modality MR, body part KNEE" and u.attempts == 1
        assert o.attempts == 2  # its lost attempt plus the recovered one
        assert len(s.scalars(select(Result).where(Result.job_fk == orphan)).all()) == 1
        assert len(s.scalars(select(OutboxItem)).all()) == 4  # SR + SC of the good job and of the orphan
    return good


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_filesystem_transport_worker_runs_jobs(worker_settings, session_factory, dicom_corpus):
    settings = worker_settings(broker_url=None, job_max_retries=2, job_retry_backoff_s=0.2)
    assert settings.uses_embedded_broker
    _run_scenario(settings, session_factory, dicom_corpus, queue=f"medgru.test.{uuid.uuid4().hex[:8]}")
    # every message was consumed: nothing left in the queue folder
    leftovers = [p for p in (settings.broker_dir / "queue").iterdir() if p.suffix == ".msg"]
    assert leftovers == []


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_redis_transport_worker_runs_jobs(worker_settings, session_factory, dicom_corpus):
    url = _redis_url()
    client = redis.Redis.from_url(url)
    assert client.ping()  # a missing Redis fails the test
    queue = f"medgru.test.{uuid.uuid4().hex[:8]}"
    settings = worker_settings(broker_url=url, job_max_retries=1, job_retry_backoff_s=0.2)
    assert not settings.uses_embedded_broker
    try:
        _run_scenario(settings, session_factory, dicom_corpus, queue=queue)
        assert client.llen(queue) == 0
    finally:
        client.delete(queue)
        client.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_job_of_a_killed_worker_is_recovered_at_restart(worker_settings, session_factory, dicom_corpus):
    """A worker killed (SIGKILL) mid-job loses its message (filesystem transport); restart recovers it."""
    settings = worker_settings(broker_url=None)
    queue = f"medgru.test.{uuid.uuid4().hex[:8]}"
    job_id = add_series(settings, session_factory, dicom_corpus, BRAINIX, body_part="BRAIN", limit=3)
    app = make_celery(settings, queue=queue)
    first = start_worker(settings, queue=queue, log_path=settings.home / "logs" / "worker1.log")
    try:
        enqueue_job(app, job_id)
        states = _wait_states(session_factory, [job_id], {job_id: {JobState.RUNNING}}, worker=first)
        assert states[job_id] is JobState.RUNNING, _worker_log(first)
    finally:
        first.kill()
    with session_factory() as s:
        assert s.get(Job, job_id).state is JobState.RUNNING  # the crash left it there

    second = start_worker(settings, queue=queue, log_path=settings.home / "logs" / "worker2.log")
    try:
        assert recover_orphans(session_factory, app) == [job_id]
        done = {job_id: {JobState.SUCCEEDED, JobState.FAILED}}
        states = _wait_states(session_factory, [job_id], done, worker=second)
        assert states[job_id] is JobState.SUCCEEDED, _worker_log(second)
    finally:
        second.stop(timeout=60)
    with session_factory() as s:
        job = s.get(Job, job_id)
        assert job.attempts == 2 and job.last_error == ""  # the lost attempt counted; success clears the note
        assert len(s.scalars(select(Result).where(Result.job_fk == job_id)).all()) == 1


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


PARENT_SCRIPT = """
import os, sys, time
from medgru.settings import Settings
from worker.embedded import start_worker
handle = start_worker(Settings(home=sys.argv[1], model=[]), queue=sys.argv[2])
print(handle.pid, flush=True)
time.sleep(3)
os._exit(0)  # the parent dies without stopping its worker
"""


def test_worker_does_not_outlive_its_parent(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PARENT_SCRIPT, str(tmp_path / "home"), f"q-{uuid.uuid4().hex[:6]}"],
                         capture_output=True, text=True, timeout=120, check=True)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 60
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(pid), f"worker {pid} outlived its parent"


BUSY_PARENT_SCRIPT = """
import subprocess, sys, time
from worker.embedded import _die_with_parent
# a child that goes on working after SIGTERM, as a worker in warm shutdown finishes its job (and took the next)
child = subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"],
                         preexec_fn=_die_with_parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(1)
"""


def test_an_orphaned_worker_stops_working_at_once(tmp_path):
    """Under SIGTERM on its parent's death the embedded worker of a killed ``medgru serve`` finished its job
    and even took the next one, while the restarted service re-queued the same jobs: two runs wrote the same
    result files at once. An orphan is now killed, whatever it is doing."""
    import os
    import signal
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", BUSY_PARENT_SCRIPT], capture_output=True, text=True, timeout=120,
                         check=True)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    survived = _alive(pid)
    if survived:
        os.kill(pid, signal.SIGKILL)
    assert not survived, f"process {pid} went on after its parent died"
