"""The worker ``medgru serve`` runs next to the listener: a Celery worker in a child process.

:func:`start_worker` launches ``python -m celery -A worker.celery_app worker --pool solo --concurrency 1``
with the parent's settings (JSON in ``MEDGRU_SETTINGS_JSON``) and queue, so the child uses the same
database, broker, models and folders; it works with the embedded filesystem broker and with Redis.
Its output goes to ``<home>/logs/worker.log`` unless a log file is given.

:func:`recover_orphans` makes sure a crash loses no job: at start-up every job still QUEUED, RETRYING or
RUNNING is put back on the queue (RUNNING ones first go back to QUEUED: nothing runs them any more).
A duplicate message is harmless: the first delivery claims the job, later ones find it done.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Job, JobState, utcnow
from worker.celery_app import DEFAULT_QUEUE, QUEUE_ENV, SETTINGS_ENV
from worker.pipeline import fail_if_it_killed_its_workers
from worker.tasks import enqueue_job

log = logging.getLogger(__name__)

UNFINISHED = (JobState.QUEUED, JobState.RETRYING, JobState.RUNNING)
INTERRUPTED_NOTE = "interrupted: the worker stopped while this job ran; re-queued at start-up"


@dataclass
class WorkerHandle:
    """A running worker process."""

    process: subprocess.Popen
    queue: str
    log_path: Path
    _log_file: object = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 60.0) -> int | None:
        """Warm shutdown (SIGTERM: the running job finishes), SIGKILL after ``timeout`` seconds.
        Returns the exit code."""
        if self._log_file is None and self.process.poll() is not None:  # stopped already (by the supervisor)
            return self.process.returncode
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop within %.0f s: killed (its job is recovered at next start)",
                            self.process.pid, timeout)
                self.process.kill()
                self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        log.info("worker %d stopped (exit code %s)", self.process.pid, self.process.returncode)
        return self.process.returncode

    def kill(self) -> None:
        """Kill the worker at once (tests of crash recovery)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


_PR_SET_PDEATHSIG = 1
try:  # resolved here, in the parent: the child runs no import between fork and exec
    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover - a libc by another name
    _prctl = None


#: the signal a worker gets when the thread that started it ends. SIGKILL, not SIGTERM: under SIGTERM (a
#: warm shutdown) the orphan finished its job and even took the next one, while the restarted ``medgru
#: serve`` re-queued those same jobs at its start, so two runs wrote the same result files at once and one
#: run's clean-up could remove the files the other's outbox rows name. A killed run is simply run again.
ORPHAN_SIGNAL = signal.SIGKILL


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the worker is killed (:data:`ORPHAN_SIGNAL`) when the process that started it dies, so no
    worker outlives a killed ``medgru serve`` (its unfinished job is recovered at the next start). The
    signal follows the *thread* that forked, not the process: call :func:`start_worker` only from a thread
    that lives as long as the worker should (the service's main thread, its supervisor thread)."""
    _prctl(_PR_SET_PDEATHSIG, ORPHAN_SIGNAL)


def worker_command(settings, queue: str, *, node_name: str | None = None) -> list[str]:
    node = node_name or f"medgru-{os.getpid()}-{uuid.uuid4().hex[:6]}@%h"
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", "solo", "--concurrency", "1", "-Q", queue, "-n", node,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", settings.log_level,
    ]


def start_worker(settings, *, queue: str = DEFAULT_QUEUE, log_path: Path | None = None) -> WorkerHandle:
    """Start a Celery worker process on ``settings``' broker consuming ``queue``."""
    settings.ensure_dirs()
    log_path = Path(log_path) if log_path is not None else settings.home / "logs" / "worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env[SETTINGS_ENV] = settings.model_dump_json()
    env[QUEUE_ENV] = queue
    env.setdefault("PYTHONUNBUFFERED", "1")
    log_file = open(log_path, "ab")
    try:
        proc = subprocess.Popen(worker_command(settings, queue), env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if _prctl is not None else None)
    except OSError:
        log_file.close()
        raise
    log.info("worker %d started on %s (queue %s); log %s", proc.pid,
             "the embedded filesystem broker" if settings.uses_embedded_broker else "the configured broker",
             queue, log_path)
    return WorkerHandle(process=proc, queue=queue, log_path=log_path, _log_file=log_file)


def recover_orphans(session_factory: sessionmaker[Session], app: Celery, *,
                    max_retries: int | None = None) -> list[int]:
    """Re-enqueue every unfinished job (QUEUED, RETRYING, RUNNING); return their ids.

    Call it at start-up, before or just after the worker starts and before any other worker of this
    database runs (a RUNNING job is assumed to be orphaned). With ``max_retries``, an orphaned job that has
    already used all its attempts goes FAILED instead: a job that kills its worker every time (out of
    memory, say) must not take the worker down for ever.
    """
    with session_factory() as session:
        jobs = session.scalars(select(Job).where(Job.state.in_(UNFINISHED)).order_by(Job.id)).all()
        ids = []
        for job in jobs:
            if max_retries is not None and fail_if_it_killed_its_workers(job, max_retries):
                continue
            if job.state is JobState.RUNNING:
                job.state = JobState.QUEUED
                job.queued_at = utcnow()
                job.last_error = INTERRUPTED_NOTE if not job.last_error else f"{job.last_error}; {INTERRUPTED_NOTE}"
                job.celery_task_id = ""
            ids.append(job.id)
        session.commit()
    for job_id in ids:
        enqueue_job(app, job_id)
    if ids:
        log.info("re-enqueued %d unfinished jobs: %s", len(ids), ", ".join(map(str, ids)))
    return ids


def wait_for(predicate, timeout: float, interval: float = 0.25) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)
