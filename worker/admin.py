"""Admin actions on jobs, shared by ``medgru jobs`` and the dashboard."""

from __future__ import annotations

import logging

from storage.models import Job, JobState

log = logging.getLogger(__name__)

RETRYABLE = frozenset({JobState.FAILED, JobState.NOT_PROCESSED, JobState.CANCELLED})
CANCELLABLE = frozenset({JobState.QUEUED, JobState.RETRYING})


def _job_for(session, job_id: int, allowed: frozenset[JobState], action: str) -> Job:
    """The job, if it exists and its state allows ``action``; else ``KeyError`` / ``ValueError``."""
    job = session.get(Job, job_id)
    if job is None:
        raise KeyError(f"no job {job_id}")
    if job.state not in allowed:
        raise ValueError(f"job {job_id} is {job.state.value}; only {sorted(s.value for s in allowed)} can be {action}")
    return job


def retry_job(session_factory, celery_app, job_id: int) -> Job:
    """Put a failed, unprocessed or cancelled job back on the queue. ``KeyError``/``ValueError`` if not allowed."""
    from worker.tasks import enqueue_job

    with session_factory() as session:
        job = _job_for(session, job_id, RETRYABLE, "retried")
        job.state = JobState.QUEUED
        job.attempts = 0
        job.last_error = ""
        job.reason = ""
        job.finished_at = None
        job.retry_at = None
        session.commit()
    enqueue_job(celery_app, job_id)
    log.info("job %d re-queued by an admin", job_id)
    return job


def cancel_job(session_factory, job_id: int) -> Job:
    """Cancel a job that has not started; a worker that later picks it up finds it cancelled and skips it."""
    with session_factory() as session:
        job = _job_for(session, job_id, CANCELLABLE, "cancelled")
        job.state = JobState.CANCELLED
        job.reason = "cancelled by an admin"
        session.commit()
    log.info("job %d cancelled by an admin", job_id)
    return job
