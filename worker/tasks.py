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
from datetime import datetime, timedelta
from typing import Any

from celery import Celery, shared_task
from sqlalchemy import Engine, and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.db import make_engine, make_session_factory
from storage.models import Job, JobState, utcnow
from worker.models import ModelRegistry
from worker.pipeline import killed_its_workers_error, process_job, retry_delay, seconds_until_retry

log = logging.getLogger(__name__)

RUN_JOB = "medgru.run_job"


@dataclass
class WorkerContext:
    """What a worker process needs to run jobs, built once per process from the app's settings."""

    settings: Any
    engine: Engine
    session_factory: sessionmaker[Session]
    registry: ModelRegistry
    #: the database was found at this release's schema (checked until it is, then no more)
    schema_checked: bool = False


class SchemaNotAtRelease(RuntimeError):
    """The database's schema is not the one this worker's release was written for: a worker started before
    the upgraded ``medgru serve`` migrated the database failed every job with the driver's "column
    jobs.heartbeat_at does not exist", and a worker of an older release than the database ran jobs with
    the older code (its result UIDs, no heartbeat) without a word."""


def require_release_schema(ctx: WorkerContext) -> None:
    """Raise :class:`SchemaNotAtRelease`, saying what to do, unless the database is at this release's schema."""
    if ctx.schema_checked:
        return
    from storage.db import head_revision, known_revisions, schema_revisions

    with ctx.engine.connect() as conn:
        current = schema_revisions(conn)
    head = head_revision()
    if current != (head,):
        known = known_revisions()
        at = ", ".join(current) or "(none)"
        if all(rev in known for rev in current):
            todo = ("start the upgraded `medgru serve` (it migrates the database at start) or run `medgru db "
                    "upgrade`")
        else:
            todo = "a newer release migrated it: upgrade this worker to that release"
        raise SchemaNotAtRelease(f"the database's schema is at revision {at}, this worker's release needs "
                                 f"{head}: {todo}; the job waits")
    ctx.schema_checked = True


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
        require_release_schema(ctx)
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


class BrokerUnavailable(ConnectionError):
    """The broker did not take a job's message (away, refusing the connection); the job waits in the
    database, where the service's sweeper finds it. Its message is one line naming the broker (password
    masked): kombu's own error came with a 170-line chained traceback in the service's log."""


def enqueue_job(app: Celery, job_id: int, *, countdown: float | None = None) -> str:
    """Send job ``job_id`` to ``app``'s job queue; returns the Celery task id. :class:`BrokerUnavailable`
    when the broker does not answer."""
    from kombu.exceptions import OperationalError
    from kombu.utils.url import maybe_sanitize_url

    options: dict[str, Any] = {}
    if countdown:
        options["countdown"] = countdown
    queue = getattr(app, "medgru_queue", None)
    if queue:
        options["queue"] = queue
    try:
        result = app.send_task(RUN_JOB, kwargs={"job_id": int(job_id)}, **options)
    except OperationalError as exc:
        raise BrokerUnavailable(f"broker {maybe_sanitize_url(str(app.conf.broker_url))} did not take job {job_id}: "
                                f"{str(exc).strip().rstrip('.')}") from exc
    log.info("job %d enqueued (task %s)", job_id, result.id)
    return result.id


class StalledJobSweeper:
    """Enqueues again the jobs that wait with no message to deliver them.

    A job is committed before it is enqueued. When the enqueue fails (the broker away), the job stays
    QUEUED with no message and nothing else would enqueue it: an admin cannot retry a QUEUED job, and the
    embedded worker's orphan recovery runs only when that worker (re)starts, never with external workers
    (``medgru serve --no-worker``). A RETRYING job whose re-scheduled message was lost is the same.

    The service calls :meth:`sweep` every ``settings.requeue_check_s``. A job that has waited (QUEUED, or
    RETRYING past its ``retry_at``) for ``settings.requeue_after_s`` since this sweeper first saw it waiting,
    or since it last enqueued it, gets a message. The broker cannot tell whether it holds a message for a
    job, so one waiting behind a long queue gets a duplicate too; that is harmless (:func:`run_job` claims
    with a conditional UPDATE: a second message finds the job running or finished and does nothing), and
    there is at most one per ``requeue_after_s``.
    """

    def __init__(self, settings, session_factory: sessionmaker[Session], app: Celery) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.app = app
        self._waiting_since: dict[int, datetime] = {}

    def reclaim_orphans(self, now: datetime | None = None) -> list[int]:
        """Queue again each RUNNING job whose worker has given no sign of life (``heartbeat_at``, else
        ``started_at``) for ``settings.job_stale_after_s``: its worker was killed (out of memory, kill -9) or
        lost its host. With external workers nothing else would: Redis re-delivers the message only after its
        visibility timeout (hours), and never when it lost it (a restart without persistence), and an admin
        can neither retry nor cancel a RUNNING job. A job that has used all its attempts goes FAILED instead
        (one that kills its worker every time). Returns the ids queued again (committed QUEUED; their
        messages are sent by :meth:`sweep`, which this precedes)."""
        now = now or utcnow()
        stale_before = now - timedelta(seconds=self.settings.job_stale_after_s)
        last_sign = func.coalesce(Job.heartbeat_at, Job.started_at)
        requeued: list[int] = []
        with self.session_factory() as session:
            ids = session.scalars(select(Job.id).where(Job.state == JobState.RUNNING, last_sign < stale_before)
                                  .order_by(Job.id)).all()
            for job_id in ids:
                job = session.get(Job, job_id, with_for_update=True)
                seen = None if job is None else (job.heartbeat_at or job.started_at)
                if job is None or job.state is not JobState.RUNNING or seen is None or seen >= stale_before:
                    continue  # finished, or its worker stamped it, since the select
                silent = (now - seen).total_seconds()
                failed = job.attempts > self.settings.job_max_retries  # a job that kills its worker every time
                if failed:
                    values = dict(state=JobState.FAILED, finished_at=now, last_error=killed_its_workers_error(job))
                else:
                    note = (f"attempt {job.attempts}: its worker gave no sign of life for {silent:.0f} s "
                            "(killed, or its host lost); queued again")
                    values = dict(state=JobState.QUEUED, queued_at=now, celery_task_id="",
                                  last_error=note if not job.last_error else f"{job.last_error}; {note}")
                # one conditional UPDATE: still this claim, still RUNNING and silent. SQLite ignores FOR
                # UPDATE and its driver opens no transaction for a SELECT: a worker that recorded its
                # outcome (or stamped its heartbeat) since the read above keeps it
                done = session.execute(
                    update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING, last_sign < stale_before,
                                      Job.celery_task_id == job.celery_task_id, Job.attempts == job.attempts)
                    .values(**values).execution_options(synchronize_session=False)).rowcount
                if done != 1:
                    continue
                if failed:
                    log.error("job %d FAILED: the worker stopped during each of its %d attempts", job_id, job.attempts)
                    continue
                requeued.append(job_id)
                log.warning("job %d: RUNNING with no sign of life from its worker for %.0f s: queued again",
                            job_id, silent)
            session.commit()
        return requeued

    def sweep(self, now: datetime | None = None) -> list[int]:
        """Queue again the orphaned RUNNING jobs (:meth:`reclaim_orphans`), then enqueue the jobs that have
        waited too long; return the ids enqueued. A failed enqueue ends the sweep (the broker is away: the
        next sweep tries again)."""
        now = now or utcnow()
        orphans = set(self.reclaim_orphans(now))
        with self.session_factory() as session:
            rows = session.execute(
                select(Job.id, Job.state, Job.retry_at, Job.queued_at)
                .where(or_(Job.state == JobState.QUEUED,
                           and_(Job.state == JobState.RETRYING, or_(Job.retry_at.is_(None), Job.retry_at <= now))))
                .order_by(Job.id)
            ).all()
        waiting: dict[int, datetime] = {}
        for job_id, _state, retry_at, queued_at in rows:
            # an orphan queued again just now has no message: due at once (and again at the next sweep
            # if this enqueue fails). A job first seen by this sweeper has waited since it was queued, not
            # since now: a restart of `medgru serve` started the wait of a job without a message again
            if job_id in orphans:
                since = now - timedelta(seconds=self.settings.requeue_after_s)
            else:
                since = self._waiting_since.get(job_id) or min(queued_at or now, now)
            waiting[job_id] = since if retry_at is None else max(since, retry_at)
        self._waiting_since = waiting  # jobs that no longer wait are forgotten
        requeued: list[int] = []
        for job_id, state, _retry_at, _queued_at in rows:
            waited = (now - waiting[job_id]).total_seconds()
            if waited < self.settings.requeue_after_s:
                continue
            try:
                enqueue_job(self.app, job_id)
            except BrokerUnavailable as exc:  # an outage: one line, no traceback
                log.error("job %d: could not be enqueued again (%s); next sweep in %g s",
                          job_id, exc, self.settings.requeue_check_s)
                break
            except Exception:
                log.exception("job %d: could not be enqueued again; next sweep in %g s",
                              job_id, self.settings.requeue_check_s)
                break
            waiting[job_id] = now
            if job_id in orphans:
                log.warning("job %d: enqueued again (its worker was lost)", job_id)
            else:
                log.warning("job %d: %s for %.0f s without a worker taking it: enqueued again",
                            job_id, state.value, waited)
            requeued.append(job_id)
        return requeued

    def run_forever(self, stop_event: threading.Event) -> None:
        """:meth:`sweep` every ``settings.requeue_check_s`` until ``stop_event`` is set (the service's thread)."""
        from storage.db import PassLog

        passes = PassLog(log, "sweep of waiting jobs")
        while not stop_event.is_set():
            try:
                self.sweep()
            except Exception as exc:  # the database away: the next sweep retries
                passes.failed(exc, self.settings.requeue_check_s)
            else:
                passes.succeeded()
            stop_event.wait(self.settings.requeue_check_s)
