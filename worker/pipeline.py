"""One job, start to finish: claim → load → select model → detect → SR + SC → outbox → SUCCEEDED.

State machine of a job (every transition stamped in the database)::

    QUEUED ──claim──▶ RUNNING ──▶ SUCCEEDED        results + outbox items written in one transaction
       ▲                 │  ├───▶ NOT_PROCESSED    no model covers the series (reason; no result objects)
       │                 │  └───▶ RETRYING ──claim──▶ RUNNING ...   (attempts <= job_max_retries)
       │                 └──────▶ FAILED           (attempts > job_max_retries; last_error kept)
       └── admin retry (FAILED / NOT_PROCESSED / CANCELLED)      QUEUED / RETRYING ──admin──▶ CANCELLED

* **claim**: a conditional UPDATE (QUEUED or RETRYING → RUNNING, ``attempts + 1``, ``started_at``), so
  two deliveries of one job never both run it. A job that is RUNNING is claimed again only by the very
  task (same Celery task id) that claimed it: that is the broker re-delivering after a worker died.
* **back-off**: a failed attempt stores ``retry_at`` (now + :func:`retry_delay`); a RETRYING job is not
  claimed before then, whichever message delivers it (the task's own scheduled retry, a duplicate, or
  the start-up re-enqueue of unfinished jobs), so a failing job cannot be hammered by extra messages.
* **terminal states** (SUCCEEDED, NOT_PROCESSED, CANCELLED, FAILED) make a delivery a no-op.
* **idempotent outputs**: the SR and SC UIDs are derived from the series and the model version, so a
  re-run writes the same files (replaced atomically) and replaces the job's earlier Result and the
  outbox rows of those UIDs.
* **cancel while running**: the final transaction re-reads the job; if it is no longer RUNNING the
  results are discarded (files removed) and its state is kept.

Destination: the route of the calling AE that sent the series (``settings.routes``), else
``settings.destination``. Outbox without a destination: when neither is set the outbox items are still
written (PENDING, ``destination`` empty, ``last_error`` saying so): the objects wait in the outbox and
are sent once a destination is configured; nothing is lost.

Logs carry the job id and UIDs only.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from inference.api import Detection, FrameSequence, ModelCard, conformal_min_normals
from storage.models import Instance, Job, JobState, OutboxItem, OutboxState, Result, SequenceRecord, utcnow
from worker.loading import load_sequence_with_sources
from worker.models import ModelRegistry

log = logging.getLogger(__name__)

#: ceiling of one retry's back-off, however many attempts
MAX_RETRY_DELAY_S = 3600.0
TERMINAL = frozenset({JobState.SUCCEEDED, JobState.NOT_PROCESSED, JobState.CANCELLED, JobState.FAILED})
NO_DESTINATION = ("no destination configured (settings.destination / MEDGRU_DESTINATION); the object "
                  "waits in the outbox until one is set")
MAX_ERROR_CHARS = 4000


@dataclass(frozen=True)
class OutputObject:
    """A result object written to the outbox folder."""

    sop_instance_uid: str
    sop_class_uid: str
    path: str  # relative to settings.outbox_dir
    kind: str  # "sr" | "sc"


def retry_delay(settings, attempts: int) -> float:
    """Seconds to wait before attempt ``attempts + 1``: exponential from ``job_retry_backoff_s``."""
    return float(min(MAX_RETRY_DELAY_S, settings.job_retry_backoff_s * (2 ** max(0, attempts - 1))))


def seconds_until_retry(job: Job, now=None) -> float:
    """Seconds until a RETRYING ``job``'s back-off ends (0 when it is over or none is pending)."""
    if job.retry_at is None:
        return 0.0
    return max(0.0, (job.retry_at - (now or utcnow())).total_seconds())


# ------------------------------------------------------------------------------------------ claim
def fail_if_it_killed_its_workers(job: Job, max_retries: int) -> bool:
    """Fail an orphaned RUNNING ``job`` (its worker died during it) that has used all its attempts, in its
    session (not committed); whether it did. A job that kills its worker every time (out of memory, say)
    must not be run again and again. Used by the broker re-delivery's claim and the embedded worker's
    orphan recovery."""
    if job.state is not JobState.RUNNING or job.attempts <= max_retries:
        return False
    job.state, job.finished_at = JobState.FAILED, utcnow()
    job.last_error = killed_its_workers_error(job)
    log.error("job %d FAILED: the worker stopped during each of its %d attempts", job.id, job.attempts)
    return True


def killed_its_workers_error(job: Job) -> str:
    """The ``last_error`` of a job failed because its worker stopped during each of its attempts (also the
    service's orphan reclaim, :meth:`worker.tasks.StalledJobSweeper.reclaim_orphans`)."""
    return (f"the worker stopped during each of its {job.attempts} attempts"
            + (f"; {job.last_error}" if job.last_error else ""))


def _fail_redelivered_killer(session_factory, job_id: int, task_id: str, max_retries: int) -> bool:
    """:func:`fail_if_it_killed_its_workers` for a broker re-delivery (the same task id) of a RUNNING job."""
    with session_factory() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.celery_task_id != task_id[:64] or not fail_if_it_killed_its_workers(job, max_retries):
            return False
        session.commit()
        return True


def claim_job(session_factory: sessionmaker[Session], job_id: int, *, task_id: str = "",
              max_retries: int | None = None) -> tuple[bool, JobState | None]:
    """Make job ``job_id`` RUNNING if it may run now. Returns ``(claimed, state)``: ``(True, RUNNING)``,
    or ``(False, its current state)`` (``None`` if there is no such job). A RETRYING job whose back-off
    (``retry_at``) has not ended may not run yet: ``(False, RETRYING)``. With ``max_retries``, a broker
    re-delivery of a RUNNING job that has used all its attempts fails it: ``(False, FAILED)``."""
    if task_id and max_retries is not None and _fail_redelivered_killer(session_factory, job_id, task_id,
                                                                        max_retries):
        return False, JobState.FAILED
    now = utcnow()
    may_run = or_(Job.state == JobState.QUEUED,
                  and_(Job.state == JobState.RETRYING, or_(Job.retry_at.is_(None), Job.retry_at <= now)))
    if task_id:
        may_run = or_(may_run, and_(Job.state == JobState.RUNNING, Job.celery_task_id == task_id))
    with session_factory() as session:
        res = session.execute(
            update(Job)
            .where(Job.id == job_id, may_run)
            .values(state=JobState.RUNNING, attempts=Job.attempts + 1, started_at=now, finished_at=None,
                    retry_at=None, celery_task_id=task_id[:64], reason="", heartbeat_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if res.rowcount == 1:
            return True, JobState.RUNNING
        job = session.get(Job, job_id)
        return False, (None if job is None else job.state)


class JobHeartbeat:
    """While the block runs, a thread stamps the RUNNING job's ``heartbeat_at`` every ``interval_s`` (only
    while the job is still this task's claim). A worker killed mid-job (out of memory, kill -9, a lost host)
    stops stamping, and the service's sweeper (:class:`worker.tasks.StalledJobSweeper`) queues the job again
    once its heartbeat is ``settings.job_stale_after_s`` old: with external workers nothing else would
    (the broker re-delivers only after its visibility timeout, never when it lost the message). A failed
    stamp (the database briefly away) is logged, without a traceback, and tried at the next beat."""

    def __init__(self, session_factory: sessionmaker[Session], job_id: int, task_id: str, interval_s: float) -> None:
        import threading

        self.session_factory, self.job_id, self.task_id, self.interval_s = session_factory, job_id, task_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"job-{job_id}-heartbeat", daemon=True)

    def beat(self) -> bool:
        """Stamp the heartbeat now; whether the job is still this task's RUNNING claim."""
        with self.session_factory() as session:
            n = session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.state == JobState.RUNNING, Job.celery_task_id == self.task_id[:64])
                .values(heartbeat_at=utcnow())
                .execution_options(synchronize_session=False)
            ).rowcount
            session.commit()
        return n == 1

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.beat():
                    log.warning("job %d is no longer this worker's RUNNING claim (cancelled, or queued again "
                                "as orphaned); its outcome will not be recorded", self.job_id)
                    return
            except Exception as exc:  # the database away: the next beat tries again
                from storage.db import error_line

                log.warning("job %d: heartbeat not recorded (%s: %s); next try in %g s",
                            self.job_id, type(exc).__name__, error_line(exc), self.interval_s)

    def __enter__(self) -> "JobHeartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s)  # a beat stuck on the database must not hold the job up


def _taken_over(job: Job, claim: str | None) -> bool:
    """Whether RUNNING ``job`` is now another delivery's claim than ``claim`` (``None``: not checked): the
    service queued it again as orphaned (its worker silent for job_stale_after_s: a long database outage, a
    frozen process) and another worker claimed it."""
    return claim is not None and job.state is JobState.RUNNING and job.celery_task_id != claim[:64]


def _finish(session: Session, job_id: int, state: JobState, *, claim: str | None = None,
            **values) -> tuple[JobState, bool]:
    """Set a RUNNING job's final state in ``session`` (not committed); return the state it ends in and
    whether this run set it. With ``claim`` (the task id that claimed it), a job another delivery has
    claimed since is left to it, also once that delivery has finished it (SUCCEEDED by the other run is
    not this run's outcome: its caller must record nothing)."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise LookupError(f"job {job_id} vanished")
    if job.state is not JobState.RUNNING or _taken_over(job, claim):
        return job.state, False  # cancelled, taken over or finished by another delivery meanwhile: leave it
    job.state = state
    job.finished_at = utcnow()
    for key, value in values.items():
        setattr(job, key, value)
    return state, True


def record_failure(settings, session_factory: sessionmaker[Session], job_id: int, exc: BaseException, *,
                   claim: str | None = None) -> JobState:
    """Record a failed attempt: RETRYING (with ``retry_at``, the end of its back-off) while retries are
    left, else FAILED. Returns the new state. With ``claim``, a job another delivery has claimed since is
    left to it."""
    message = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    with session_factory() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise LookupError(f"job {job_id} vanished while recording its failure: {message}")
        if job.state is not JobState.RUNNING or _taken_over(job, claim):
            session.rollback()
            return job.state
        final = job.attempts > settings.job_max_retries
        job.state = JobState.FAILED if final else JobState.RETRYING
        job.last_error = message
        delay = 0.0
        if final:
            job.finished_at = utcnow()
            job.retry_at = None
        else:
            delay = retry_delay(settings, job.attempts)
            job.retry_at = utcnow() + timedelta(seconds=delay)
        attempts = job.attempts
        session.commit()
    if final:
        log.error("job %d FAILED after %d attempts: %s", job_id, attempts, message)
        return JobState.FAILED
    log.warning("job %d attempt %d failed, will retry in %.1f s (%d of %d retries used): %s",
                job_id, attempts, delay, attempts, settings.job_max_retries, message)
    return JobState.RETRYING


# ------------------------------------------------------------------------------------ the outputs
@dataclass(frozen=True)
class OverlayFrame:
    """What the SC shows: frame ``index`` of the sequence with ``heatmap``; ``frame_score`` is that frame's
    own score when the heat map explains the frame alone (``None``: the sequence's heat map), the highest
    of the ``among`` frames it was chosen from (``None``: of the whole sequence)."""

    index: int
    heatmap: np.ndarray
    frame_score: float | None = None
    among: int | None = None

    @classmethod
    def at_peak(cls, detection: Detection, candidates: Sequence[int] | None = None) -> "OverlayFrame":
        """The frame where the sequence's heat map peaks (:func:`reporting.sc.pick_frame`), with it;
        among ``candidates`` (frame indices; default all)."""
        from reporting.sc import pick_frame

        if candidates is None:
            k = pick_frame(detection.heatmaps)
        else:
            indices = list(candidates)
            k = indices[pick_frame(detection.heatmaps[indices])]
        return cls(k, detection.heatmaps[k])


def current_study_frames(sources: Sequence[Dataset], sequence: FrameSequence) -> tuple[int, ...]:
    """The indices of the frames of the current study, the study of the last source, where the SR and the
    SC land. A prior study's frames lead the sequence when ``settings.add_prior_study`` added them
    (:mod:`pacs_listener.assembly`, "Prior study"); the SC must not show one of those: it would carry the
    prior's study while its UIDs derive from the current series. Frames map to sources as in
    :func:`build_result_objects`."""
    current = str(sources[-1].StudyInstanceUID)
    if sequence.frame_refs:
        study_of = {str(ds.SOPInstanceUID): str(ds.StudyInstanceUID) for ds in sources}
        studies = [study_of.get(str(uid)) for uid, _ in sequence.frame_refs]
    else:
        studies = [str(sources[min(i, len(sources) - 1)].StudyInstanceUID) for i in range(sequence.length)]
    return tuple(i for i, study in enumerate(studies) if study == current)


def overlay_frame(detector, sequence: FrameSequence, detection: Detection,
                  candidates: Sequence[int] | None = None) -> OverlayFrame:
    """Choose the frame the overlay SC shows, and its heat map, among ``candidates`` (frame indices; the
    worker passes :func:`current_study_frames`; default all).

    Where the detector scored each frame alone (``detection.frame_scores``, T > 1), the SC shows the frame
    with the highest own score among the candidates, with the Grad-CAM of that frame scored alone (one
    more ``detect`` of one frame): the frame that decided the series' verdict, since a prior study's
    frames are not judged. MedGRU-SVC's series heat map already holds the same map at that frame; the one
    more call (about 0.016 s) keeps the rule the same for every detector. Otherwise (one frame, or no
    frame scores): the frame where the sequence's heat map peaks (:meth:`OverlayFrame.at_peak`)."""
    if len(detection.frame_scores) > 1 and len(detection.frame_scores) == sequence.length:
        frames = tuple(range(sequence.length)) if candidates is None else tuple(candidates)
        k = max(frames, key=lambda i: detection.frame_scores[i])  # the first of equals, as np.argmax
        alone = replace(sequence, frames=sequence.frames[k:k + 1], context_frames=0,
                        frame_refs=sequence.frame_refs[k:k + 1] if sequence.frame_refs else ())
        explained = detector.detect(alone, explain=True)
        return OverlayFrame(k, explained.heatmaps[0], float(detection.frame_scores[k]),
                            None if len(frames) == sequence.length else len(frames))
    return OverlayFrame.at_peak(detection, candidates)


def build_result_objects(sources: Sequence[Dataset], sequence: FrameSequence, detection: Detection,
                         card: ModelCard, settings, overlay: OverlayFrame | None = None,
                         predecessors: Sequence[str] = ()) -> list[tuple[str, Dataset]]:
    """The SR and the Grad-CAM SC for ``detection``: ``[("sr", ds), ("sc", ds)]``.

    ``sources`` are the datasets of the sequence's instances in frame order. The SC shows ``overlay``
    (:func:`overlay_frame`; default: the frame where the sequence's heat map peaks), referencing that
    frame's instance (and frame number when it is multi-frame); both objects derive their UIDs from the
    series of the last source (the current study when a prior leads the sequence) and land in its study,
    so the SC shows a frame of that study (:func:`current_study_frames`; a prior's frame is refused).
    ``predecessors``: earlier SRs of the series by this model and version (of :func:`earlier_results`), which
    the SR names as the reports it revises.
    """
    from reporting.sc import build_overlay_sc
    from reporting.sr import build_sr

    sr = build_sr(list(sources), detection, card, ae_title=settings.ae_title, frame_refs=sequence.frame_refs,
                  context_frames=sequence.context_frames, predecessors=predecessors)
    current = current_study_frames(sources, sequence)
    overlay = overlay or OverlayFrame.at_peak(detection, current)
    k = overlay.index
    if k not in current:
        raise ValueError(f"overlay frame {k + 1} belongs to a prior study, not to the current study "
                         f"{sources[-1].StudyInstanceUID} where the SC lands")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    if sequence.frame_refs:
        uid, number = sequence.frame_refs[k]
        source = by_uid[str(uid)]
    else:
        source, number = sources[min(k, len(sources) - 1)], k + 1
    sc = build_overlay_sc(  # it names the frame number only where the source's SOP class has frames
        source, sequence.frames[k], overlay.heatmap, detection, card,
        frame_index=k, n_frames=sequence.length, source_frame_number=int(number),
        series_uid=str(sources[-1].SeriesInstanceUID), frame_score=overlay.frame_score,
        frame_score_among=overlay.among,
        frame_refs=result_frame_refs(sequence, sources),
    )
    return [("sr", sr), ("sc", sc)]


def result_frame_refs(sequence: FrameSequence, sources: Sequence[Dataset]) -> list[tuple[str, int]]:
    """The (SOP Instance UID, frame number) of each frame a result was computed from, which its objects'
    UIDs derive from: the sequence's, else frame 1 of each source."""
    return list(sequence.frame_refs) or [(str(ds.SOPInstanceUID), 1) for ds in sources]


def write_atomically(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file at ``path``: temp file in the same folder, fsync, rename, fsync of the
    folder. The outbox row that names the file is committed next: without the folder's fsync a power loss
    could keep the row and lose the rename, and the result would never reach the PACS (file missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def outbox_relpath(sop_instance_uid: str) -> str:
    """Where a result object lives, relative to ``settings.outbox_dir`` (one file per UID)."""
    return f"{sop_instance_uid}.dcm"


def write_outputs(settings, objects: list[tuple[str, Dataset]]) -> list[OutputObject]:
    out: list[OutputObject] = []
    for kind, ds in objects:
        uid = str(ds.SOPInstanceUID)
        rel = outbox_relpath(uid)
        write_atomically(ds, settings.outbox_dir / rel)
        out.append(OutputObject(sop_instance_uid=uid, sop_class_uid=str(ds.SOPClassUID), path=rel, kind=kind))
    return out


# --------------------------------------------------------------------------------------- the job
def process_job(settings, session_factory: sessionmaker[Session], job_id: int, registry: ModelRegistry,
                *, task_id: str = "") -> JobState:
    """Run job ``job_id`` once and return the state it is left in.

    Never raises for a failure of the job itself (bad pixels, a detector error...): that is recorded as
    RETRYING or FAILED. A job that may not run now (terminal, or running elsewhere) is left alone and
    its state returned. Database errors propagate (the caller retries the delivery).
    """
    claimed, state = claim_job(session_factory, job_id, task_id=task_id, max_retries=settings.job_max_retries)
    if state is None:
        raise LookupError(f"no job {job_id}")
    if not claimed:
        if state is JobState.RETRYING:
            log.info("job %d is in its retry back-off: not run before it ends", job_id)
        else:
            log.info("job %d is %s: nothing to do here", job_id, state.value)
        return state
    try:
        with JobHeartbeat(session_factory, job_id, task_id, settings.job_heartbeat_s):
            return _run(settings, session_factory, job_id, registry, claim=task_id)
    except Exception as exc:  # every failure of the job is recorded, never dropped
        log.debug("job %d failed", job_id, exc_info=True)
        return record_failure(settings, session_factory, job_id, exc, claim=task_id)


def series_calling_ae(session: Session, series_id: int) -> str:
    """The calling AE title that sent the series' latest instance ("" when unknown): the key of
    ``settings.routes``, which sends a series' results back where it came from."""
    return session.scalars(select(Instance.calling_ae).where(Instance.series_fk == series_id)
                           .order_by(Instance.received_at.desc(), Instance.id.desc()).limit(1)).first() or ""


def earlier_results(session: Session, series_id: int, job_id: int, card: ModelCard) -> list[tuple[str, str]]:
    """The (SR, SC) SOP Instance UIDs of the series' results by this model and version, oldest first; an
    empty string where a result has no such object. They come from older jobs (made from other frames: a late
    slice re-scored the series; or from the same, whose UIDs are then the new result's own) and from this
    job's own result that a re-run replaces: made from the same frames its UIDs are the new result's own,
    but a result made by a release whose UIDs did not carry the frames (before 2026-12-07) has others, and
    the re-run's SR must revise it, not sit beside it unnamed. Newer jobs' results are left out, and so are
    the objects a newer job's result holds (under such a release a late slice's result took the first's
    UIDs): a re-run of an older job (`medgru jobs retry --rerun`) must neither claim to revise nor reject the
    newer, current result. The new SR names the earlier SRs (but its own UID) as the reports it revises, so
    a viewer that shows both tells which is current; with ``reject_revised_results`` a rejection note lists
    them and the SCs (:func:`rejection_note`)."""
    of_series = (select(Job.id.label("job_id"), Result.sr_sop_instance_uid.label("sr"),
                        Result.sc_sop_instance_uid.label("sc"))
                 .join(Job, Result.job_fk == Job.id).join(SequenceRecord, Job.sequence_fk == SequenceRecord.id)
                 .where(SequenceRecord.series_fk == series_id, Result.model_name == card.name,
                        Result.model_version == card.version))
    rows = session.execute(of_series.order_by(Result.id)).all()
    # a newer job's result is the current one: none of its objects may be revised or rejected here. Under a
    # release whose UIDs did not carry the frames, a late slice's result had the same UIDs as the first
    # job's, so the older job's result may name the very objects the newer one holds now
    newer = {uid for row in rows if row.job_id > job_id for uid in (row.sr, row.sc) if uid}
    # older jobs' results and this job's own
    pairs = ((row.sr or "", row.sc or "") for row in rows if row.job_id <= job_id)
    pairs = ((sr if sr not in newer else "", sc if sc not in newer else "") for sr, sc in pairs)
    return list(dict.fromkeys(pair for pair in pairs if pair != ("", "")))


def rejection_note(sources: Sequence[Dataset], sequence: FrameSequence, card: ModelCard, settings,
                   results: list[tuple[str, Dataset]], earlier: Sequence[tuple[str, str]]) -> Dataset | None:
    """The IOCM rejection note (:mod:`reporting.kos`) of the ``earlier`` results' SR and SC that the new
    ``results`` replace, or ``None``: ``settings.reject_revised_results`` is off, or nothing differs (a
    re-run of the same frames gives the same UIDs, which must not be rejected)."""
    if not getattr(settings, "reject_revised_results", False):
        return None
    from reporting.kos import RejectedObject, build_rejection_note

    new = {kind: ds for kind, ds in results}
    own = {str(ds.SOPInstanceUID) for ds in new.values()}
    rejected = [RejectedObject(str(new[kind].SeriesInstanceUID), str(new[kind].SOPClassUID), uid)
                for pair in earlier for kind, uid in zip(("sr", "sc"), pair)
                if uid and uid not in own and kind in new]
    if not rejected:
        return None
    return build_rejection_note(sources[-1], rejected, card, frame_refs=result_frame_refs(sequence, sources),
                                ae_title=settings.ae_title)


def warn_uncovered_series(job_id: int, series_uid: str, detector, detection: Detection, judged: int) -> str:
    """Where a series' verdict does not hold the target false-positive rate, log a warning and return it
    for the job's note (the dashboard's and ``medgru jobs``'s note column); else return "". Either the model
    has no calibration scores (a folder from before they were kept, or a threshold set by hand), so the
    highest of its frames meets the single-image threshold; or the series has more frames than the
    calibration normals cover, so its threshold is their largest score and the rate is bounded by
    T / (n + 1), above the target (:meth:`inference.api.Detector.series_fpr_bound`)."""
    if judged < 2:
        return ""
    name = detector.card.name if getattr(detector, "card", None) is not None else "the model"
    alpha = getattr(detector, "calibration_alpha", None)
    if alpha is None:
        note = (f"{judged} frames judged, but {name} keeps no calibration scores: the highest frame met the "
                "single-image threshold, so the false-positive rate is above the model's target; `medgru "
                "calibrate` on normal images adds them")
    else:
        bound = detection.extras.get("series_fpr_bound")
        if bound is None or bound <= alpha + 1e-12:
            return ""
        note = (f"{judged} frames judged, more than the calibration normals of {name} cover: the "
                f"false-positive rate is bounded by {bound:.3g}, not {alpha:.3g}; `medgru calibrate` on at least "
                f"{conformal_min_normals(alpha / judged)} normal frames restores it")
    log.warning("job %d (series %s): %s", job_id, series_uid, note)
    return note


def _run(settings, session_factory: sessionmaker[Session], job_id: int, registry: ModelRegistry, *,
         claim: str | None = None) -> JobState:
    with session_factory() as session:
        job = session.get(Job, job_id)
        sequence = job.sequence
        series = sequence.series
        modality, body_part, series_uid = series.modality or "", series.body_part or "", series.series_uid
        sequence_id = sequence.id

        choice = registry.select(modality, body_part)
        if choice is None:
            reason = (f"no model covers modality {modality.upper() or '(none)'}, "
                      f"body part {body_part.upper() or '(none)'}")
            state, ours = _finish(session, job_id, JobState.NOT_PROCESSED, claim=claim, reason=reason,
                                  last_error="", model_name="", model_version="")
            session.commit()
            if not ours:
                log.info("job %d became %s while running; nothing recorded", job_id, state.value)
                return state
            log.info("job %d (series %s) not processed: %s; models: %s", job_id, series_uid, reason,
                     registry.describe())
            return state
        model_dir, card = choice
        frames, sources = load_sequence_with_sources(settings, session, sequence_id)
        calling_ae = series_calling_ae(session, series.id)
        earlier = earlier_results(session, series.id, job_id, card)

    detector = registry.get(model_dir)
    card = detector.card or card
    t0 = time.perf_counter()
    detection = detector.detect(frames, explain=True)
    overlay = overlay_frame(detector, frames, detection, current_study_frames(sources, frames))
    seconds = time.perf_counter() - t0
    how = ""
    if len(detection.frame_scores) > 1:  # the highest judged frame against the threshold for their number
        how = f" (highest of {len(frames.judged)} frames scored alone"
        if "sequence_score" in detection.extras:
            how += f"; ConvGRU over all {frames.length}: {detection.extras['sequence_score']:.4f}"
        how += ")"
    log.info("job %d (series %s): %s %s scored %.4f vs threshold %.4f%s (%s) in %.2f s", job_id, series_uid,
             card.name, card.version, detection.score, detection.threshold, how, detection.verdict, seconds)
    note = warn_uncovered_series(job_id, series_uid, detector, detection, len(frames.judged))

    predecessors = list(dict.fromkeys(sr for sr, _ in earlier if sr))
    objects = build_result_objects(sources, frames, detection, card, settings, overlay, predecessors)
    rejection = rejection_note(sources, frames, card, settings, objects, earlier)
    if rejection is not None:
        objects.append(("kos", rejection))
    outputs = write_outputs(settings, objects)
    by_kind = {o.kind: o for o in outputs}
    routed = settings.destination_for(calling_ae)
    destination = str(routed) if routed is not None else ""

    with session_factory() as session:
        uids = [o.sop_instance_uid for o in outputs]
        old_results = select(Result.id).where(Result.job_fk == job_id)
        replaced = or_(OutboxItem.result_fk.in_(old_results), OutboxItem.sop_instance_uid.in_(uids))
        # the replaced rows' files that no new object overwrote (a result made under other UIDs): once their
        # rows are gone, nothing (retention included) would ever remove them
        stale_files = set(session.scalars(select(OutboxItem.path).where(replaced))) - {o.path for o in outputs}
        session.execute(delete(OutboxItem).where(replaced))
        stale_files -= set(session.scalars(select(OutboxItem.path).where(OutboxItem.path.in_(stale_files))))
        session.execute(delete(Result).where(Result.job_fk == job_id))
        result = Result(
            job_fk=job_id,
            score=float(detection.score),
            threshold=float(detection.threshold),
            is_anomaly=bool(detection.is_anomaly),
            cluster_label=detection.cluster_label or "",
            model_name=card.name,
            model_version=card.version,
            sr_sop_instance_uid=by_kind["sr"].sop_instance_uid if "sr" in by_kind else "",
            sc_sop_instance_uid=by_kind["sc"].sop_instance_uid if "sc" in by_kind else "",
            inference_seconds=float(seconds),
            frame_scores=[float(v) for v in detection.frame_scores] if len(detection.frame_scores) > 1 else None,
        )
        session.add(result)
        session.flush()
        now = utcnow()
        for o in outputs:
            session.add(OutboxItem(
                result_fk=result.id, path=o.path, sop_instance_uid=o.sop_instance_uid,
                sop_class_uid=o.sop_class_uid, destination=destination, state=OutboxState.PENDING,
                attempts=0, next_attempt_at=now, last_error="" if destination else NO_DESTINATION,
            ))
        state, ours = _finish(session, job_id, JobState.SUCCEEDED, claim=claim, last_error="", reason=note,
                              model_name=card.name, model_version=card.version)
        if state is JobState.RUNNING and not ours:  # another worker runs it now: the same UIDs, so the same files
            session.rollback()
            log.warning("job %d was queued again and claimed by another worker while this one ran it; this "
                        "run's results were discarded", job_id)
            return state
        if not ours:  # cancelled, queued again, or finished by another delivery (whose outbox rows stay)
            session.rollback()
            kept = set(session.scalars(select(OutboxItem.sop_instance_uid).where(OutboxItem.sop_instance_uid.in_(uids))))
            for o in outputs:  # remove our files unless an earlier, still valid outbox row points at them
                if o.sop_instance_uid not in kept:
                    (settings.outbox_dir / o.path).unlink(missing_ok=True)
            log.info("job %d became %s while running; its results were discarded", job_id, state.value)
            return state
        session.commit()
    for path in stale_files:
        (settings.outbox_dir / path).unlink(missing_ok=True)
    log.info("job %d SUCCEEDED: SR %s, SC %s queued for %s", job_id, result.sr_sop_instance_uid,
             result.sc_sop_instance_uid, destination or "(no destination yet)")
    return JobState.SUCCEEDED
