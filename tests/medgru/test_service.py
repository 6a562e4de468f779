"""``medgru serve``'s Service keeps its embedded worker running: a worker process that dies (killed for
memory, a crash) is restarted and the jobs it left are queued again."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from sqlalchemy.exc import OperationalError

import medgru.service as service_module
import worker.embedded as embedded
from medgru.service import Service
from storage.models import Job, JobState, Patient, SequenceRecord, Series, Study


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return bool(predicate())


def _add_job(service: Service, state: JobState = JobState.RUNNING, attempts: int = 1) -> int:
    """A job (by default one the worker was running when it died); no model covers OT / NONE: run, it ends
    NOT_PROCESSED."""
    with service.session_factory() as s:
        series = Series(series_uid="1.2.3.4", study=Study(study_uid="1.2.3", patient=Patient(patient_id="P")),
                        modality="OT", body_part="NONE")
        job = Job(sequence=SequenceRecord(series=series, frame_refs=[["1.2.3.4.1", 1]], n_frames=1),
                  state=state, attempts=attempts)
        s.add(job)
        s.commit()
        return job.id


def _job_state(service: Service, job_id: int) -> JobState:
    with service.session_factory() as s:
        return s.get(Job, job_id).state


def test_a_killed_worker_is_restarted_and_its_job_queued_again(make_settings):
    settings = make_settings(listen_port=0, dashboard_port=0, job_max_retries=3)
    service = Service(settings).start()
    try:
        first = service.worker.pid
        assert service.health()["worker"] is None
        job_id = _add_job(service)
        os.kill(first, signal.SIGKILL)
        assert _wait(lambda: service.worker.pid != first and service.worker.is_alive(), 60)
        assert service.worker_restarts == 1 and service.health()["worker"] is None
        # re-queued, then run by the new worker: no model covers OT / NONE, so it ends NOT_PROCESSED
        assert _wait(lambda: _job_state(service, job_id) is JobState.NOT_PROCESSED, 120), _job_state(service, job_id)
    finally:
        service.stop()
    assert not service.worker.is_alive()


def test_supervision_outlives_a_failed_restart_and_the_worker_it_starts_runs(make_settings, monkeypatch, caplog):
    """The database away during the orphan recovery, then a failed fork: each is logged and the restart tried
    again. Before, the first error ended the supervisor thread for good, and with it (PR_SET_PDEATHSIG is
    tied to the forking thread) any worker that thread had just started: no job ran again."""
    monkeypatch.setattr(service_module, "WORKER_CHECK_S", 0.1)
    monkeypatch.setattr(service_module, "WORKER_RESTART_DELAY_S", 0.1, raising=False)
    failures = {"recover_orphans": 1, "start_worker": 1}
    armed = threading.Event()  # the service's own start-up calls succeed; the supervisor's first ones fail

    def failing_once(name, real, error):
        def call(*args, **kwargs):
            if armed.is_set() and failures[name]:
                failures[name] -= 1
                raise error
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(embedded, "recover_orphans", failing_once(
        "recover_orphans", embedded.recover_orphans,
        OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))))
    monkeypatch.setattr(embedded, "start_worker", failing_once(
        "start_worker", embedded.start_worker, BlockingIOError(11, "Resource temporarily unavailable")))
    settings = make_settings(listen_port=0, dashboard_port=0, job_max_retries=3)
    service = Service(settings).start()
    try:
        armed.set()
        job_id = _add_job(service)
        first = service.worker.pid
        with caplog.at_level(logging.ERROR, logger="medgru.service"):
            os.kill(first, signal.SIGKILL)
            assert _wait(lambda: _job_state(service, job_id) is JobState.NOT_PROCESSED, 180), \
                _job_state(service, job_id)
        assert failures == {"recover_orphans": 0, "start_worker": 0}
        assert service.worker.pid != first and service.worker.is_alive() and service.worker_restarts == 1
        health = service.health()
        assert health["worker-supervisor"] is None and health["worker"] is None, health
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert [type(r.exc_info[1]) for r in tracebacks] == [OperationalError, BlockingIOError]
    finally:
        service.stop()
    assert not service.worker.is_alive()


def test_the_service_without_a_worker_enqueues_a_waiting_job_again(make_settings):
    """``medgru serve --no-worker`` (workers elsewhere): a job committed while the broker was away, so with no
    message, gets one from the service's sweep; before, it stayed QUEUED for ever."""
    import base64
    import json

    settings = make_settings(listen_port=0, dashboard_port=0, requeue_after_s=0.0, requeue_check_s=0.05)
    service = Service(settings, with_worker=False).start()
    try:
        job_id = _add_job(service, state=JobState.QUEUED, attempts=0)

        def queued_job_ids() -> list[int]:
            ids = []
            for path in (settings.broker_dir / "queue").glob("*.msg"):
                try:
                    ids.append(json.loads(base64.b64decode(json.loads(path.read_text())["body"]))[1]["job_id"])
                except (OSError, ValueError):  # being written (or taken) just now: the next look sees it
                    continue
            return ids

        assert _wait(lambda: job_id in queued_job_ids(), 60)
        assert service.health()["queue-sweeper"] is None
    finally:
        service.stop()


def test_stopping_the_service_gives_back_the_outbox_items_of_a_send_in_flight(make_settings, monkeypatch):
    """``systemctl restart`` while a send to a slow PACS is in flight: the items it claimed are due again when
    the service stops, not an hour later when the claim's lease would end."""
    from datetime import datetime, timezone

    import dispatch.sender as sender_module
    from storage.models import OutboxItem, OutboxState

    in_send, let_go = threading.Event(), threading.Event()

    def hung_peer(destination, paths, **_kw):  # a PACS that takes the association and never answers
        in_send.set()
        let_go.wait(60)
        return [sender_module.StoreOutcome(p, sender_module.STATUS_SUCCESS, "") for p in paths]

    class SlowSender(sender_module.Sender):
        def __init__(self, *a, **kw):
            super().__init__(*a, send=hung_peer, **kw)

    monkeypatch.setattr(sender_module, "Sender", SlowSender)
    settings = make_settings(listen_port=0, dashboard_port=0, destination="PACS@127.0.0.1:11112")
    service = Service(settings, with_worker=False).start()
    try:
        with service.session_factory() as s:
            s.add(OutboxItem(path="sr.dcm", sop_instance_uid="1.2.826.0.1.3680043.10.9.1",
                             sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", destination="",
                             state=OutboxState.PENDING, attempts=0,
                             next_attempt_at=datetime(2000, 1, 1, tzinfo=timezone.utc)))
            s.commit()
        assert in_send.wait(30)
        with service.session_factory() as s:
            claimed_until = s.query(OutboxItem).one().next_attempt_at
        stopped_at = datetime.now(timezone.utc)
        assert (claimed_until - stopped_at).total_seconds() > 60  # the claim's lease
    finally:
        service.stop()
        let_go.set()
    with service.session_factory() as s:
        item = s.query(OutboxItem).one()
    assert item.state == OutboxState.PENDING and item.attempts == 0
    assert item.next_attempt_at.replace(tzinfo=timezone.utc) <= datetime.now(timezone.utc)


def test_the_service_records_at_start_the_files_quarantined_while_the_database_was_away(make_settings):
    """A file refused (0x0110) while the database did not answer, the service stopped before it answered
    again: its row is written by the started service's first pass, so `medgru quarantine list` shows it and
    `medgru quarantine retry` can store it."""
    from pacs_listener.spool import QuarantineReason, write_quarantine
    from storage.models import QuarantineItem

    settings = make_settings(listen_port=0, dashboard_port=0)
    settings.ensure_dirs()
    rel = write_quarantine(settings.quarantine_dir, b"DICM", QuarantineReason(
        reason="database record failed: OperationalError", status_code=0x0110, status_text="Processing Failure",
        calling_ae="ORTHANC", sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.4"))
    service = Service(settings, with_worker=False).start()
    try:
        def rows():
            with service.session_factory() as s:
                return [(q.path, q.calling_ae, q.status_code) for q in s.query(QuarantineItem)]

        assert _wait(lambda: rows() != [], 60)
        assert rows() == [(rel, "ORTHANC", 0x0110)]
        assert service.health()["quarantine-recorder"] is None
    finally:
        service.stop()


WARM_WORKER_SCRIPT = """
import pathlib, signal, sys, time
def warm_shutdown(*_):  # a Celery worker's SIGTERM: the running job finishes, then it exits 0
    pathlib.Path(sys.argv[1]).write_text("warm shutdown")
    sys.exit(0)
signal.signal(signal.SIGTERM, warm_shutdown)
pathlib.Path(sys.argv[1] + ".ready").touch()
while True:
    time.sleep(0.05)
"""


def test_stopping_the_service_gives_a_restarted_worker_its_warm_shutdown(make_settings, monkeypatch, tmp_path):
    """A worker restarted by the supervisor thread gets PR_SET_PDEATHSIG's SIGKILL as that thread ends. On a
    clean stop (systemctl stop) the thread ended first, so the worker was killed in the middle of its job
    (seen live: 'worker 28272 stopped (exit code -9)') instead of the warm shutdown that lets it finish."""
    import subprocess
    import sys

    from worker.embedded import WorkerHandle

    monkeypatch.setattr(service_module, "WORKER_CHECK_S", 0.1)
    monkeypatch.setattr(service_module, "WORKER_RESTART_DELAY_S", 0.1)
    monkeypatch.setattr(embedded, "recover_orphans", lambda *args, **kwargs: [])
    mark = tmp_path / "worker-stopped"
    monkeypatch.setattr(embedded, "worker_command",
                        lambda settings, queue, node_name=None: [sys.executable, "-c", WARM_WORKER_SCRIPT, str(mark)])
    service = Service(make_settings(listen_port=0, dashboard_port=0))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    service.worker = WorkerHandle(process=dead, queue="q", log_path=tmp_path / "w.log")
    supervisor = threading.Thread(target=service._supervise_worker, args=(service._stop,), name="worker-supervisor",
                                  daemon=True)
    service._threads.append(supervisor)
    supervisor.start()
    try:
        assert _wait(lambda: service.worker_restarts == 1 and (tmp_path / "worker-stopped.ready").exists(), 60)
    finally:
        service.stop()
    assert not service.worker.is_alive()
    assert service.worker.process.returncode == 0, f"the restarted worker ended with {service.worker.process.returncode}"
    assert mark.read_text() == "warm shutdown"
