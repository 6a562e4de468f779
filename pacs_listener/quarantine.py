"""Admin views of the quarantine, shared by ``medgru quarantine`` and the dashboard.

Every instance the listener refuses is kept under ``settings.quarantine_dir`` with a ``.reason.json``
sidecar (:func:`pacs_listener.spool.write_quarantine`) and recorded in the ``quarantine`` table. These
views show what a PACS admin needs to find the sender and fix the data: when, from which calling AE, the
SOP Instance and Class UIDs, the DIMSE status we answered and our reason. Never patient data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pacs_listener.spool import read_quarantine_reason
from pacs_listener.status import describe
from storage.models import QuarantineItem

log = logging.getLogger(__name__)


def status_text(code: int) -> str:
    """``'0xA900 Failure: Error: Data Set does not match SOP Class'``."""
    return f"0x{code:04X} {describe(code)}"


def _row(item: QuarantineItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "received_at": item.received_at.isoformat() if item.received_at else None,
        "calling_ae": item.calling_ae,
        "sop_instance_uid": item.sop_instance_uid,
        "sop_class_uid": item.sop_class_uid,
        "status_code": item.status_code,
        "status": status_text(item.status_code),
        "reason": item.reason,
        "path": item.path,
        "purged_at": item.purged_at.isoformat() if item.purged_at else None,
        "released_at": item.released_at.isoformat() if item.released_at else None,
    }


def quarantine_rows(session, *, limit: int = 50, calling_ae: str | None = None) -> list[dict[str, Any]]:
    """The latest quarantined instances (from ``calling_ae`` only, if given), newest first."""
    q = select(QuarantineItem).order_by(QuarantineItem.id.desc()).limit(max(1, limit))
    if calling_ae:
        q = q.where(QuarantineItem.calling_ae == calling_ae)
    return [_row(item) for item in session.scalars(q).all()]


def quarantine_detail(session, quarantine_dir: Path, item_id: int) -> dict[str, Any]:
    """One quarantined instance: its row, the file's absolute path and size, and the sidecar's extra UIDs
    (study, series, transfer syntax; none once retention removed it). ``KeyError`` if there is no such item."""
    item = session.get(QuarantineItem, item_id)
    if item is None:
        raise KeyError(f"no quarantined instance {item_id}")
    path = quarantine_dir / item.path
    detail = _row(item) | {"file": str(path), "file_bytes": path.stat().st_size if path.is_file() else None}
    if item.purged_at is not None:  # retention removed the file and its reason file; the row keeps the reason
        return detail
    try:
        sidecar = read_quarantine_reason(quarantine_dir, item.path)
    except (OSError, ValueError) as exc:
        detail["sidecar_error"] = f"{type(exc).__name__}: {exc}"
    else:
        for key in ("study_uid", "series_uid", "transfer_syntax_uid"):
            detail[key] = sidecar.get(key, "")
    return detail


def _received_at(text: Any) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def record_unrecorded(quarantine_dir: Path, session_factory, paths: Iterable[str] | None = None) -> list[str]:
    """Write the ``quarantine`` row of each kept file that has none, from its ``.reason.json``; return their
    paths. ``paths`` (relative to ``quarantine_dir``): those to check; ``None``: every file kept there.

    A refusal while the database does not answer (status 0x0110, the very case ``medgru quarantine retry``
    is for) kept the file and its reason but wrote no row, and nothing wrote it later: the instance was
    missing from ``medgru quarantine list``, the dashboard, ``medgru_refused_instances_total`` and its
    alert, and could not be retried. Database errors propagate (the caller tries again)."""
    if paths is None:
        paths = sorted(f"{p.parent.name}/{p.name}" for p in Path(quarantine_dir).glob("*/*.dcm"))
    wanted = list(dict.fromkeys(paths))
    if not wanted:
        return []
    added: list[str] = []
    with session_factory() as session:
        known = set(session.scalars(select(QuarantineItem.path)))
        for rel in wanted:
            if rel in known or not (Path(quarantine_dir) / rel).is_file():
                continue  # recorded already; or its file was never written (the disk full) or is removed
            try:
                sidecar = read_quarantine_reason(Path(quarantine_dir), rel)
                status_code = int(sidecar["status_code"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("quarantined file %s has no readable reason (%s: %s); not recorded",
                            rel, type(exc).__name__, exc)
                continue
            item = QuarantineItem(
                path=rel, reason=str(sidecar.get("reason", ""))[:2000], status_code=status_code,
                sop_instance_uid=str(sidecar.get("sop_instance_uid", ""))[:64],
                sop_class_uid=str(sidecar.get("sop_class_uid", ""))[:64],
                calling_ae=str(sidecar.get("calling_ae", ""))[:16])
            if (when := _received_at(sidecar.get("received_at"))) is not None:
                item.received_at = when
            session.add(item)
            added.append(rel)
        session.commit()
    for rel in added:
        log.warning("quarantined file %s recorded in the database after all (it was refused while the database "
                    "did not answer)", rel)
    return added
