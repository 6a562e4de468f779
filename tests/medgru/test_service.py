"""``medgru serve``'s Service keeps its embedded worker running: a worker process that dies (killed for
memory, a crash) is restarted and the jobs it left are queued again."""

from __future__ import annotations

import os
import signal
import time

from medgru.service import Service
from storage.models import Job, JobState, Patient, SequenceRecord, Series, Study


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return bool(predicate())


def test_a_killed_worker_is_restarted_and_its_job_queued_again(make_settings):
    settings = make_settings(listen_port=0, dashboard_port=0, job_max_retries=3)
    service = Service(settings).start()
    try:
        first = service.worker.pid
        assert service.health()["worker"] is None
        with service.session_factory() as s:  # the job the worker was running when it died
            series = Series(series_uid="1.2.3.4", study=Study(study_uid="1.2.3", patient=Patient(patient_id="P")),
                            modality="OT", body_part="NONE")
            job = Job(sequence=SequenceRecord(series=series, frame_refs=[["1.2.3.4.1", 1]], n_frames=1),
                      state=JobState.RUNNING, attempts=1)
            s.add(job)
            s.commit()
            job_id = job.id
        os.kill(first, signal.SIGKILL)
        assert _wait(lambda: service.worker.pid != first and service.worker.is_alive(), 60)
        assert service.worker_restarts == 1 and service.health()["worker"] is None
        # re-queued, then run by the new worker: no model covers OT / NONE, so it ends NOT_PROCESSED
        def state():
            with service.session_factory() as s:
                return s.get(Job, job_id).state
        assert _wait(lambda: state() is JobState.NOT_PROCESSED, 120), state()
    finally:
        service.stop()
    assert not service.worker.is_alive()
