"""Celery tasks: ``run_job(job_id=...)`` runs one job through :func:`worker.pipeline.process_job`.

Messages carry IDs only. The task is idempotent: a job already SUCCEEDED, NOT_PROCESSED, CANCELLED or
FAILED is left alone, and a duplicate message for a job another worker is running is dropped (the
claim is a conditional UPDATE). A failed attempt leaves the job RETRYING with ``retry_at`` =
now + ``job_retry_backoff_s * 2**(attempt-1)`` seconds, and the task re-schedules itself for then; a
message that delivers a RETRYING job before its ``retry_at`` (a duplicate, the start-up re-enqueue) does
not run it but re-schedules itself for the rest of the back-off. After ``job_max_retries`` retries the job
is FAILED with its ``last_error`` (never dropped; ``medgru jobs retry`` puts it back).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from celery import Celery, shared_task
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from storage.db import make_engine, make_session_factory
from storage.models import Job, JobState
from worker.models import ModelRegistry
from worker.pipeline import process_job, retry_delay, seconds_until_retry

log = logging.getLogger(__name__)

RUN_JOB = "medgru.run_job"


@dataclass
class WorkerContext:
    """What a worker process needs to run jobs, built once per process from the app's settings."""

    settings: Any
    engine: Engine
    session_factory: sessionmaker[Session]
    registry: ModelRegistry


_context_lock = threading.Lock()


def worker_context(app: Celery) -> WorkerContext:
    """The process's :class:`WorkerContext` for ``app`` (built lazily, after any fork)."""
    with _context_lock:
        ctx = getattr(app, "medgru_context", None)
        if ctx is None:
            settings = getattr(app, "medgru_settings", None)
            if settings is None:
                raise RuntimeError("this Celery app was not built by worker.celery_app.make_celery (no settings)")
            engine = make_engine(settings.effective_database_url)
            ctx = WorkerContext(settings, engine, make_session_factory(engine), ModelRegistry.from_settings(settings))
            app.medgru_context = ctx  # type: ignore[attr-defined]
        return ctx


@shared_task(bind=True, name=RUN_JOB, max_retries=None, acks_late=True, reject_on_worker_lost=True,
             ignore_result=True)
def run_job(self, *, job_id: int) -> str:
    """Run job ``job_id``; returns the state it ended in."""
    ctx = worker_context(self.app)
    settings = ctx.settings
    job_id = int(job_id)
    try:
        state = process_job(settings, ctx.session_factory, job_id, ctx.registry, task_id=self.request.id or "")
    except LookupError as exc:  # no such job (deleted?): nothing to run, nothing to keep
        log.error("job %d: %s; message dropped", job_id, exc)
        return "missing"
    except Exception as exc:
        # process_job records every job failure itself; what reaches here is infrastructure (the database
        # unreachable...). The job is RUNNING or QUEUED in the database; try again later.
        delay = retry_delay(settings, self.request.retries + 1)
        log.error("job %d: could not record its outcome (%s: %s); task retried in %.1f s",
                  job_id, type(exc).__name__, exc, delay)
        raise self.retry(exc=exc, countdown=delay)
    if state is JobState.RETRYING:  # failed just now, or delivered again before its back-off ended
        with ctx.session_factory() as session:
            job = session.get(Job, job_id)
            if job is None:
                log.error("job %d vanished while RETRYING; message dropped", job_id)
                return "missing"
            attempts = job.attempts
            delay = seconds_until_retry(job) if job.retry_at is not None else retry_delay(settings, attempts)
        log.info("job %d: attempt %d failed; next attempt in %.1f s", job_id, attempts, delay)
        raise self.retry(countdown=delay)
    return state.value


def enqueue_job(app: Celery, job_id: int, *, countdown: float | None = None) -> str:
    """Send job ``job_id`` to ``app``'s job queue; returns the Celery task id."""
    options: dict[str, Any] = {}
    if countdown:
        options["countdown"] = countdown
    queue = getattr(app, "medgru_queue", None)
    if queue:
        options["queue"] = queue
    result = app.send_task(RUN_JOB, kwargs={"job_id": int(job_id)}, **options)
    log.info("job %d enqueued (task %s)", job_id, result.id)
    return result.id
