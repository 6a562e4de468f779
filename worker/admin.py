"""Admin actions on jobs, shared by ``medgru jobs`` and the dashboard."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, or_, select, update

from medgru.tables import when
from storage.models import (Instance, Job, JobState, OutboxItem, OutboxState, Result, SequenceRecord, Series, Study,
                            utcnow)

log = logging.getLogger(__name__)

RETRYABLE = frozenset({JobState.FAILED, JobState.NOT_PROCESSED, JobState.CANCELLED})
#: what an admin may also re-run on purpose (after a model update, say): its SR and SC are replaced
RERUNNABLE = RETRYABLE | {JobState.SUCCEEDED}
CANCELLABLE = frozenset({JobState.QUEUED, JobState.RETRYING})


def _set_state_if(session, job_id: int, allowed: frozenset[JobState], action: str, **values) -> None:
    """Change job ``job_id`` with ``values`` only if its state is still one of ``allowed`` (one conditional
    UPDATE); else ``ValueError`` naming the state it is in now. Between reading a job and writing it, a
    worker may claim it (RUNNING) or another admin act on it: a plain write would overwrite that, so a
    cancel acknowledged a job that was already running, and two Retry clicks both re-queued it."""
    session.commit()  # end the transaction that read the job: the UPDATE must see the state as it is now
    done = session.execute(update(Job).where(Job.id == job_id, Job.state.in_(allowed)).values(**values)
                           .execution_options(synchronize_session=False)).rowcount
    session.commit()
    if done != 1:
        state = session.scalar(select(Job.state).where(Job.id == job_id))
        raise ValueError(f"job {job_id} is {getattr(state, 'value', state)}; only "
                         f"{sorted(s.value for s in allowed)} can be {action}")


def _job_for(session, job_id: int, allowed: frozenset[JobState], action: str) -> Job:
    """The job, if it exists and its state allows ``action``; else ``KeyError`` / ``ValueError``."""
    job = session.get(Job, job_id)
    if job is None:
        raise KeyError(f"no job {job_id}")
    if job.state not in allowed:
        raise ValueError(f"job {job_id} is {job.state.value}; only {sorted(s.value for s in allowed)} can be {action}")
    return job


def retry_job(session_factory, celery_app, job_id: int, *, rerun_succeeded: bool = False) -> Job:
    """Put a failed, unprocessed or cancelled job (with ``rerun_succeeded`` also a succeeded one) back on
    the queue. ``KeyError``/``ValueError`` if not allowed, or if retention has removed a file the job reads
    (the job could only fail again: the series must be sent again first). A re-run replaces the job's
    result, SR and SC (the same UIDs for the same model, version and frames)."""
    from worker.loading import first_purged_instance, purged_error
    from worker.tasks import enqueue_job

    allowed = RERUNNABLE if rerun_succeeded else RETRYABLE
    with session_factory() as session:
        job = _job_for(session, job_id, allowed, "retried")
        purged = first_purged_instance(session, job.sequence)
        if purged is not None:
            raise ValueError(f"job {job_id} cannot run: {purged_error(purged)}")
        _set_state_if(session, job_id, allowed, "retried", state=JobState.QUEUED, queued_at=utcnow(), attempts=0,
                      last_error="", reason="", finished_at=None, retry_at=None)
        session.refresh(job)
    enqueue_job(celery_app, job_id)
    log.info("job %d re-queued by an admin", job_id)
    return job


def cancel_job(session_factory, job_id: int) -> Job:
    """Cancel a job that has not started; a worker that later picks it up finds it cancelled and skips it."""
    with session_factory() as session:
        job = _job_for(session, job_id, CANCELLABLE, "cancelled")
        _set_state_if(session, job_id, CANCELLABLE, "cancelled", state=JobState.CANCELLED,
                      reason="cancelled by an admin")
        session.refresh(job)
    log.info("job %d cancelled by an admin", job_id)
    return job


def job_fields(session, job_id: int) -> list[tuple[str, str]]:
    """One job in detail, as ``(label, value)`` pairs: states, times, errors, its sequence, series and study
    UIDs, each result and where its SR and SC are (``medgru jobs show`` and the dashboard's job page).
    ``KeyError`` if there is no such job. UIDs only, never patient data."""
    job = session.get(Job, job_id)
    if job is None:
        raise KeyError(f"no job {job_id}")
    seq = job.sequence
    series = seq.series
    fields: list[tuple[str, object]] = [
        ("job", job.id), ("state", job.state.value), ("attempts", job.attempts),
        ("created", when(job.created_at)), ("started", when(job.started_at)),
        ("finished", when(job.finished_at)),
        *([("next attempt", when(job.retry_at))] if job.state is JobState.RETRYING and job.retry_at else []),
        ("model", f"{job.model_name} {job.model_version}".strip()),
        ("reason", job.reason), ("last error", job.last_error), ("celery task", job.celery_task_id),
        ("sequence", f"{seq.id} ({seq.n_frames} frames, ordered by {seq.order_key or 'none'})"),
        ("series UID", series.series_uid), ("study UID", series.study.study_uid),
        ("modality", series.modality), ("body part", series.body_part),
    ]
    if seq.prior_study_uid:
        fields.append(("prior study UID", seq.prior_study_uid))
    latest_seq = session.scalar(select(func.max(SequenceRecord.id)).where(SequenceRecord.series_fk == series.id))
    if latest_seq == seq.id and series.state_reason:  # the assembler's note on this sequence (images left out)
        fields.append(("assembly", series.state_reason))
    for res in session.scalars(select(Result).where(Result.job_fk == job.id).order_by(Result.id)).all():
        fields += [
            ("result", f"score {res.score:.4f}, threshold {res.threshold:.4f}, "
                       f"{'abnormal' if res.is_anomaly else 'normal'}"
                       + (f", cluster {res.cluster_label}" if res.cluster_label else "")
                       + f", {res.model_name} {res.model_version}, {res.inference_seconds:.2f} s"),
            ("SR UID", res.sr_sop_instance_uid), ("SC UID", res.sc_sop_instance_uid),
        ]
        if res.frame_scores:
            from worker.loading import context_frame_count, instance_series

            context = context_frame_count(seq, instance_series(session, seq)) if seq.prior_study_uid else 0
            fields.append(("frame scores", format_frame_scores(res.frame_scores, res.threshold, context)))
        for item in session.scalars(select(OutboxItem).where(OutboxItem.result_fk == res.id)
                                    .order_by(OutboxItem.id)).all():
            fields.append(("outbox", f"{item.sop_instance_uid} {item.state.value} to "
                                     f"{item.destination or '(none)'}, {item.attempts} attempts"
                                     + (f": {item.last_error}" if item.last_error else "")))
    return [(k, "" if v is None else str(v)) for k, v in fields]


def format_frame_scores(scores, threshold: float, context: int = 0) -> str:
    """``'1: 826.1*  2: 554.3*  3: 183.0 …'``: each frame's own score in sequence order, ``*`` where a judged
    frame is above the threshold, and how many are. The first ``context`` frames (a prior study's) are
    marked ``(prior)``: read, not judged."""
    judged = [float(v) for v in scores][context:]
    above = sum(v > threshold for v in judged)
    cells = "  ".join(
        f"{i}: {float(v):.4g}" + (" (prior)" if i <= context else "*" if float(v) > threshold else "")
        for i, v in enumerate(scores, 1))
    prior = f"; frames 1-{context} are the prior study's, not judged" if context else ""
    return f"{cells}  ({above} of {len(judged)} judged frames above the threshold, *{prior})"


def jobs_query(*, state: str | None = None, find: str | None = None, limit: int = 100, before: int | None = None):
    """``select(Job, SequenceRecord, Series)``, newest first: the jobs in ``state`` and, with ``find``, those
    of the series, study, accession number or SOP instance it names (exact match; what a radiologist or
    the PACS reports when asking "did the AI see this study?"). ``before``: only jobs with a smaller id (the
    next page of a list that stopped at that job)."""
    q = (select(Job, SequenceRecord, Series)
         .join(SequenceRecord, Job.sequence_fk == SequenceRecord.id)
         .join(Series, SequenceRecord.series_fk == Series.id)
         .order_by(Job.id.desc()).limit(max(1, limit)))
    if state:
        q = q.where(Job.state == JobState(state))
    if before is not None:
        q = q.where(Job.id < before)
    if find:
        value = find.strip()
        q = q.join(Study, Series.study_fk == Study.id).where(or_(
            Series.series_uid == value, Study.study_uid == value, Study.accession_number == value,
            Series.id.in_(select(Instance.series_fk).where(Instance.sop_instance_uid == value)),
        ))
    return q


def series_without_jobs(session, find: str, limit: int = 100) -> list[dict[str, Any]]:
    """The series that ``find`` names (as :func:`jobs_query`: series, study, accession number or SOP
    instance) that have no job, each with its state and the assembler's reason: a series set IGNORED (no
    image content, our own output, an assembly that failed on its data) or still RECEIVING. "Did the AI see
    this study?" must not answer "no job" alone for what was received and skipped for a reason."""
    value = find.strip()
    has_job = select(SequenceRecord.series_fk).join(Job, Job.sequence_fk == SequenceRecord.id)
    q = (select(Series).join(Study, Series.study_fk == Study.id)
         .where(or_(Series.series_uid == value, Study.study_uid == value, Study.accession_number == value,
                    Series.id.in_(select(Instance.series_fk).where(Instance.sop_instance_uid == value))),
                Series.id.not_in(has_job))
         .order_by(Series.id.desc()).limit(max(1, limit)))
    return [{"series_uid": x.series_uid, "modality": x.modality, "body_part": x.body_part,
             "state": x.state.value, "reason": x.state_reason or "",
             "last_received_at": when(x.last_received_at)} for x in session.scalars(q)]


def delivery_by_result(session, result_ids: list[int]) -> dict[int, str]:
    """Whether each result's SR and SC reached the PACS, as ``"2/2"``, ``"1/2, 1 failed"`` or ``"0/2"``."""
    counts: dict[int, dict[OutboxState, int]] = {}
    if result_ids:
        for result_id, item_state, n in session.execute(
                select(OutboxItem.result_fk, OutboxItem.state, func.count())
                .where(OutboxItem.result_fk.in_(result_ids)).group_by(OutboxItem.result_fk, OutboxItem.state)):
            counts.setdefault(result_id, {})[item_state] = n
    out = {}
    for result_id, by_state in counts.items():
        text = f"{by_state.get(OutboxState.SENT, 0)}/{sum(by_state.values())}"
        if by_state.get(OutboxState.FAILED):
            text += f", {by_state[OutboxState.FAILED]} failed"
        out[result_id] = text
    return out


def job_rows(session, limit: int = 100, state: str | None = None, find: str | None = None,
             before: int | None = None) -> list[dict[str, Any]]:
    """The jobs of :func:`jobs_query`, each with its latest result, as dicts (``medgru jobs list``, the
    dashboard and its JSON API). Three queries however many jobs: the jobs, their latest results, and
    where those results' objects are."""
    rows = []
    found = session.execute(jobs_query(state=state, find=find, limit=limit, before=before)).all()
    latest_ids = (select(func.max(Result.id)).where(Result.job_fk.in_([job.id for job, _, _ in found]))
                  .group_by(Result.job_fk))
    latest = {r.job_fk: r for r in session.scalars(select(Result).where(Result.id.in_(latest_ids)))}
    delivered = delivery_by_result(session, [r.id for r in latest.values()])
    for job, seq, series in found:
        res = latest.get(job.id)
        rows.append({
            "id": job.id,
            "state": job.state.value,
            "attempts": job.attempts,
            "series_uid": series.series_uid,
            "modality": series.modality,
            "body_part": series.body_part,
            "frames": seq.n_frames,
            "score": None if res is None else round(res.score, 4),
            "threshold": None if res is None else round(res.threshold, 4),
            "verdict": None if res is None else ("abnormal" if res.is_anomaly else "normal"),
            "cluster": None if res is None else (res.cluster_label or None),
            "model": f"{job.model_name} {job.model_version}".strip() or None,
            "in_pacs": None if res is None else delivered.get(res.id, ""),
            "note": job.reason or job.last_error or "",
            "created_at": job.created_at.isoformat() if job.created_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "updated_at": when(job.finished_at or job.started_at or job.created_at),
            "retry_at": job.retry_at.isoformat() if job.retry_at and job.state is JobState.RETRYING else None,
        })
    return rows
