"""Retention: remove the files the service no longer needs, keep every row.

Nothing else ever deletes a file, so without retention a worker beside a busy PACS fills its disk and the
listener then refuses instances with 0xA700 (out of resources). The rules (each off at 0 days):

* **spool** (``settings.retention_days``): the file of a received instance once its series' last instance
  is older than that, the series is no longer receiving (assembled or ignored), and no job that waits,
  runs, retries or has FAILED (an admin may retry it) reads the instance, prior-study frames included;
* **outbox** (the same days): the file of a result the PACS took, that long after it was sent; pending
  and failed results are never touched;
* **quarantine** (``settings.quarantine_retention_days``): a refused file and its ``.reason.json``.

Rows get ``purged_at`` and stay: what was received, from whom, and what we sent remain answerable, and
the quarantine row keeps the reason. The row is marked first and the file removed after, so a crash in
between leaves a file too many, never a job without its file. A purged instance no longer counts for
assembly or as a prior study; a resend of it restores its file (:mod:`pacs_listener.scp`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from storage.models import (
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    QuarantineItem,
    SequenceRecord,
    Series,
    SeriesState,
    utcnow,
)

log = logging.getLogger(__name__)

#: a job in one of these states may still read its frames
JOB_STATES_NEEDING_FILES = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING, JobState.FAILED)
_BATCH = 500


@dataclass
class PruneReport:
    """What one pass removed (or, in a dry run, would remove)."""

    dry_run: bool = False
    instances: int = 0
    results: int = 0
    quarantined: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def files(self) -> int:
        return self.instances + self.results + self.quarantined

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        text = (f"retention {verb} {self.instances} instance file(s), {self.results} sent result file(s), "
                f"{self.quarantined} quarantined file(s): {self.bytes / 1e6:.1f} MB")
        return text + (f"; {len(self.errors)} error(s)" if self.errors else "")


def _protected_uids(session: Session) -> set[str]:
    """SOP Instance UIDs that a waiting, running, retrying or failed job reads."""
    refs = session.scalars(select(SequenceRecord.frame_refs).join(Job, Job.sequence_fk == SequenceRecord.id)
                           .where(Job.state.in_(JOB_STATES_NEEDING_FILES))).all()
    return {str(uid) for frame_refs in refs for uid, _frame in (frame_refs or [])}


def _remove(path: Path, root: Path, report: PruneReport) -> None:
    """Unlink ``path`` (counting its bytes), then its parent folders up to ``root`` while they are empty."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    except OSError as exc:
        report.errors.append(f"{path.name}: {exc}")
        return
    if report.dry_run:
        report.bytes += size
        return
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        report.errors.append(f"{path.name}: {exc}")
        log.error("retention: cannot remove %s: %s", path, exc)
        return
    report.bytes += size
    parent = path.parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
        parent = parent.parent


def prune(settings, session_factory: sessionmaker[Session], *, now: datetime | None = None,
          dry_run: bool = False) -> PruneReport:
    """One retention pass under ``settings`` (see the module docstring); returns what it removed."""
    now = now or utcnow()
    report = PruneReport(dry_run=dry_run)
    if settings.retention_days > 0:
        cutoff = now - timedelta(days=settings.retention_days)
        _prune_spool(settings, session_factory, cutoff, now, report)
        _prune_outbox(settings, session_factory, cutoff, now, report)
    if settings.quarantine_retention_days > 0:
        _prune_quarantine(settings, session_factory, now - timedelta(days=settings.quarantine_retention_days),
                          now, report)
    if report.files or report.errors:
        log.info("%s", report.summary())
    return report


def _mark_and_remove(sf, model, rows: list, root: Path, now: datetime, report: PruneReport,
                     files_of=lambda path: (path,), still: tuple = (),
                     needed: Callable[[Session, list[int]], set[int]] | None = None) -> int:
    """Mark ``rows`` (``(id, path relative to root)``) of ``model`` purged, in batches, where they are still
    unmarked and match ``still``; then remove the files of those marked (``files_of(path)``). Returns how
    many rows that was (all of them in a dry run, which marks and removes nothing).

    ``needed(session, ids)``, when given, runs in the marking transaction after the mark and names the rows
    among ``ids`` that must keep their file after all (a condition ``still`` cannot express in SQL); they
    are unmarked before the commit, so nobody ever sees them purged."""
    done = 0
    for start in range(0, len(rows), _BATCH):
        batch = rows[start:start + _BATCH]
        if not report.dry_run:
            ids = [i for i, _ in batch]
            with sf() as session:
                session.execute(update(model).where(model.id.in_(ids), model.purged_at.is_(None), *still)
                                .values(purged_at=now).execution_options(synchronize_session=False))
                keep = needed(session, ids) if needed is not None else set()
                if keep:
                    session.execute(update(model).where(model.id.in_(keep), model.purged_at == now)
                                    .values(purged_at=None).execution_options(synchronize_session=False))
                session.commit()
                marked = set(session.scalars(select(model.id).where(model.id.in_(ids), model.purged_at.is_not(None))))
            batch = [(i, rel) for i, rel in batch if i in marked]
        for _, rel in batch:
            for path in files_of(root / rel):
                _remove(path, root, report)
        done += len(batch)
    return done


def _needed_by_a_job(session: Session, ids: list[int]) -> set[int]:
    """The instances among ``ids`` that a job reads now, in the transaction that marks them purged.

    The assembler may have queued a job reading them (a prior study's frames) since :func:`_prune_spool`
    listed the protected UIDs. On SQLite the mark took the database's write lock, which the assembler's
    claim needs before it reads the prior study, so every such job is either committed and seen here or
    will see the mark. PostgreSQL lets an assembler read the prior before the mark and commit its job
    after this check: the SHARE lock on ``series`` waits for every transaction that changed a series (an
    assembler claims its series first) and holds off new claims, and the listener's stores, until this
    transaction commits (one batch: a short wait). Neither of them waits on the instance rows marked here,
    so the lock taken after the mark cannot deadlock.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"LOCK TABLE {Series.__tablename__} IN SHARE MODE"))
    protected = _protected_uids(session)
    rows = session.execute(select(Instance.id, Instance.sop_instance_uid).where(Instance.id.in_(ids))).all()
    return {i for i, uid in rows if uid in protected}


def _prune_spool(settings, sf, cutoff: datetime, now: datetime, report: PruneReport) -> None:
    # re-checked when marking: a late instance may have re-opened the series meanwhile, and the assembler
    # may have queued a job reading some of these instances (_needed_by_a_job)
    settled = select(Series.id).where(Series.state != SeriesState.RECEIVING, Series.last_received_at < cutoff)
    with sf() as session:
        protected = _protected_uids(session)
        rows = session.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.path)
            .where(Instance.purged_at.is_(None), Instance.series_fk.in_(settled))
            .order_by(Instance.id)
        ).all()
    chosen = [(i, rel) for i, uid, rel in rows if uid not in protected]
    report.instances += _mark_and_remove(sf, Instance, chosen, settings.spool_dir, now, report,
                                         still=(Instance.series_fk.in_(settled),), needed=_needed_by_a_job)


def _prune_outbox(settings, sf, cutoff: datetime, now: datetime, report: PruneReport) -> None:
    with sf() as session:
        rows = session.execute(
            select(OutboxItem.id, OutboxItem.path)
            .where(OutboxItem.state == OutboxState.SENT, OutboxItem.purged_at.is_(None),
                   OutboxItem.sent_at < cutoff)
            .order_by(OutboxItem.id)
        ).all()
    report.results += _mark_and_remove(sf, OutboxItem, [tuple(r) for r in rows], settings.outbox_dir, now, report,
                                       still=(OutboxItem.state == OutboxState.SENT,))


def _quarantine_files(path: Path) -> tuple[Path, Path]:
    """The refused file, then its reason (never a quarantined file without its reason, as when written)."""
    return path, path.with_name(path.name.removesuffix(".dcm") + ".reason.json")


def _prune_quarantine(settings, sf, cutoff: datetime, now: datetime, report: PruneReport) -> None:
    with sf() as session:
        rows = session.execute(
            select(QuarantineItem.id, QuarantineItem.path)
            .where(QuarantineItem.purged_at.is_(None), QuarantineItem.received_at < cutoff)
            .order_by(QuarantineItem.id)
        ).all()
    report.quarantined += _mark_and_remove(sf, QuarantineItem, [tuple(r) for r in rows], settings.quarantine_dir,
                                           now, report, files_of=_quarantine_files)


def run_forever(settings, session_factory: sessionmaker[Session], stop_event) -> None:
    """Apply retention every ``settings.prune_interval_s`` until ``stop_event`` is set (the service's thread)."""
    log.info("retention: instance and sent-result files after %g days, quarantined files after %g days "
             "(0 = kept), checked every %g s", settings.retention_days, settings.quarantine_retention_days,
             settings.prune_interval_s)
    from storage.db import PassLog

    passes = PassLog(log, "retention pass")
    while not stop_event.is_set():
        try:
            prune(settings, session_factory)
        except Exception as exc:  # a failed pass (database away) must not end the thread; the next one retries
            passes.failed(exc, settings.prune_interval_s)
        else:
            passes.succeeded()
        stop_event.wait(settings.prune_interval_s)
