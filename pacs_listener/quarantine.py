"""Admin views of the quarantine, shared by ``medgru quarantine`` and the dashboard.

Every instance the listener refuses is kept under ``settings.quarantine_dir`` with a ``.reason.json``
sidecar (:func:`pacs_listener.spool.write_quarantine`) and recorded in the ``quarantine`` table. These
views show what a PACS admin needs to find the sender and fix the data: when, from which calling AE, the
SOP Instance and Class UIDs, the DIMSE status we answered and our reason. Never patient data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from pacs_listener.spool import read_quarantine_reason
from pacs_listener.status import describe
from storage.models import QuarantineItem


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
    (study, series, transfer syntax). ``KeyError`` if there is no such item."""
    item = session.get(QuarantineItem, item_id)
    if item is None:
        raise KeyError(f"no quarantined instance {item_id}")
    path = quarantine_dir / item.path
    detail = _row(item) | {"file": str(path), "file_bytes": path.stat().st_size if path.is_file() else None}
    try:
        sidecar = read_quarantine_reason(quarantine_dir, item.path)
    except (OSError, ValueError) as exc:
        detail["sidecar_error"] = f"{type(exc).__name__}: {exc}"
    else:
        for key in ("study_uid", "series_uid", "transfer_syntax_uid"):
            detail[key] = sidecar.get(key, "")
    return detail
