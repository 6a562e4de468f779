"""Retrying a quarantined instance: ``medgru quarantine retry``.

An instance is quarantined for one of two kinds of reason. Either the data are wrong (it does not parse,
its UIDs are invalid, its pixel module does not add up): the sender must fix it. Or something went wrong
on our side while it arrived (the spool could not be written, the database did not answer): the
instance is fine and the PACS may never send it again (a 0x0110 processing failure is not retried by most
PACS). For the second kind an admin puts the kept file through the listener's own store path once the
fault is fixed: :func:`retry_quarantined`.

The retry runs exactly the checks and writes of a C-STORE (:meth:`pacs_listener.scp.Listener.store`),
with the calling AE the instance came from. On success the instance is spooled and recorded as if it had
just arrived (the running service's assembler sees its series after the quiet period) and the quarantine
row gets ``released_at``; the kept file stays until quarantine retention removes it. On failure nothing is
written and no new quarantine row is made: the retry reports the reason it would have been refused with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from medgru.settings import Settings
from pacs_listener.scp import Listener
from pacs_listener.spool import read_quarantine_reason
from pacs_listener.status import StoreStatus, describe
from pacs_listener.validate import RequestIds
from storage.models import QuarantineItem, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryOutcome:
    item_id: int
    stored: bool
    message: str


class _Retrying(Listener):
    """The listener's store path, where a refusal is reported instead of quarantined a second time."""

    refusal = ""

    def _quarantine(self, data: bytes, request: RequestIds, calling_ae: str, reason: str, status: StoreStatus,
                    ds_uids: dict[str, str] | None = None) -> int:
        self.refusal = f"{describe(status)}: {reason}"
        return status


def retry_quarantined(settings: Settings, session_factory: sessionmaker[Session],
                      item_ids: list[int] | None = None) -> list[RetryOutcome]:
    """Put quarantined instances through the store path again: the items ``item_ids``, or with ``None``
    every item not yet released whose file is still kept, oldest first."""
    with session_factory() as session:
        if item_ids is None:
            item_ids = list(session.scalars(  # not the copies answered Success and kept aside (other content
                # than the stored copy): nothing can store them, and --all reported each as failed every run
                select(QuarantineItem.id).where(QuarantineItem.released_at.is_(None),
                                                QuarantineItem.purged_at.is_(None),
                                                QuarantineItem.status_code != int(StoreStatus.SUCCESS))
                .order_by(QuarantineItem.id)))
    listener = _Retrying(settings, session_factory)
    return [_retry_one(listener, session_factory, item_id) for item_id in item_ids]


def _retry_one(listener: _Retrying, session_factory: sessionmaker[Session], item_id: int) -> RetryOutcome:
    with session_factory() as session:
        item = session.get(QuarantineItem, item_id)
        if item is None:
            return RetryOutcome(item_id, False, f"no quarantined instance {item_id}")
        if item.released_at is not None:
            return RetryOutcome(item_id, False, f"already stored by a retry on {item.released_at:%Y-%m-%d %H:%M} UTC")
        if item.status_code == int(StoreStatus.SUCCESS):  # answered Success and kept aside: nothing to store
            return RetryOutcome(item_id, False, "not stored: a second copy of a stored instance, with other "
                                                "content; the first copy stays the one used")
        path = listener.quarantine_dir / item.path
        if item.purged_at is not None or not path.is_file():
            return RetryOutcome(item_id, False, "its file was removed (retention, or by hand): the PACS must send it again")
        calling_ae, rel = item.calling_ae, item.path
        sop_class_uid, sop_instance_uid = item.sop_class_uid, item.sop_instance_uid
    try:
        transfer_syntax = str(read_quarantine_reason(listener.quarantine_dir, rel).get("transfer_syntax_uid", ""))
    except (OSError, ValueError):
        transfer_syntax = ""
    if not transfer_syntax:  # no sidecar: the file's own meta header, if it reads
        try:
            transfer_syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        except Exception:  # noqa: BLE001 - an unreadable file: the store path below names the problem
            transfer_syntax = ""
    request = RequestIds(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                         transfer_syntax_uid=transfer_syntax)
    listener.refusal = ""
    status = listener.store(path.read_bytes(), request, calling_ae)
    if status != StoreStatus.SUCCESS:
        return RetryOutcome(item_id, False, f"refused again: {listener.refusal or describe(status)}")
    if listener.refusal:  # answered Success yet kept aside: a copy with other content than the one stored
        return RetryOutcome(item_id, False, f"not stored: {listener.refusal.partition(': ')[2]}")
    with session_factory() as session:
        session.get(QuarantineItem, item_id).released_at = utcnow()
        session.commit()
    log.info("quarantined instance %d (%s) from %s stored by an admin's retry", item_id, sop_instance_uid, calling_ae)
    return RetryOutcome(item_id, True, f"stored {sop_instance_uid}")
