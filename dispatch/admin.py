"""Admin views of the outbox, shared by ``medgru outbox`` and the dashboard.

An outbox row is one result object (an SR or an overlay SC) on its way to the PACS. Rows show ids, SOP
Instance UIDs, the destination and the last error; never patient data. Putting FAILED rows back is
:func:`dispatch.sender.requeue_failed`.
"""

from __future__ import annotations

from typing import Any

from pydicom.uid import UID
from sqlalchemy import select

from storage.models import OutboxItem, OutboxState, Result

def object_kind(sop_class_uid: str) -> str:
    """``'Comprehensive 3D SR'``, ``'Secondary Capture Image'``: the SOP class's name without "Storage"."""
    name = UID(sop_class_uid).name
    return name.removesuffix(" Storage") if name != sop_class_uid else sop_class_uid


def outbox_rows(session, *, states: tuple[OutboxState, ...] | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The outbox items in ``states`` (all by default), newest first, with the job they report on."""
    q = (select(OutboxItem, Result.job_fk)
         .outerjoin(Result, OutboxItem.result_fk == Result.id)
         .order_by(OutboxItem.id.desc()).limit(max(1, limit)))
    if states:
        q = q.where(OutboxItem.state.in_(states))
    rows = []
    for item, job_id in session.execute(q).all():
        rows.append({
            "id": item.id,
            "state": item.state.value,
            "kind": object_kind(item.sop_class_uid),
            "job": job_id,
            "sop_instance_uid": item.sop_instance_uid,
            "destination": item.destination or "",
            "attempts": item.attempts,
            "last_status": item.last_status,
            "last_error": item.last_error or "",
            "created_at": item.created_at.isoformat() if item.created_at else None,
            "next_attempt_at": (item.next_attempt_at.isoformat()
                                if item.next_attempt_at and item.state is OutboxState.PENDING else None),
            "sent_at": item.sent_at.isoformat() if item.sent_at else None,
        })
    return rows


def failed_item_ids(session, item_ids: list[int]) -> tuple[list[int], dict[int, LookupError | ValueError]]:
    """Of ``item_ids``, those that are FAILED, and for each of the others why it cannot be re-sent: a
    ``KeyError`` (no such item) or a ``ValueError`` (not failed)."""
    found = {i.id: i for i in session.scalars(select(OutboxItem).where(OutboxItem.id.in_(item_ids))).all()}
    ok: list[int] = []
    refused: dict[int, LookupError | ValueError] = {}
    for i in item_ids:
        item = found.get(i)
        if item is None:
            refused[i] = KeyError(f"no outbox item {i}")
        elif item.state is not OutboxState.FAILED:
            refused[i] = ValueError(f"outbox item {i} is {item.state.value}; only failed items can be re-sent")
        else:
            ok.append(i)
    return ok, refused


def resend_items(session_factory, item_ids: list[int]) -> tuple[list[int], dict[int, LookupError | ValueError]]:
    """Put the FAILED ones of ``item_ids`` back to PENDING (due now, attempts reset); returns them, and for
    each of the others why it was not (:func:`failed_item_ids`)."""
    from dispatch.sender import requeue_failed

    with session_factory() as session:
        ok, refused = failed_item_ids(session, list(dict.fromkeys(item_ids)))
    if ok:
        requeue_failed(session_factory, ok)
    return ok, refused


def resend_item(session_factory, item_id: int) -> None:
    """:func:`resend_items` for one item; ``KeyError`` if there is no such item, ``ValueError`` if it is not
    failed."""
    _, refused = resend_items(session_factory, [item_id])
    if refused:
        raise refused[item_id]
