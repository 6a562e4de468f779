"""Sending result objects to the PACS: a C-STORE client and the durable outbox loop.

:func:`send_files` stores files on a peer over ONE association and returns the DIMSE status of each
C-STORE. :class:`Sender` drains the ``outbox`` table: every due PENDING item is sent, items of one
destination share an association, and the outcome is written back.

Retry policy (never drops an item):

* success (status 0x0000 or a warning status: the peer stored it) -> ``SENT`` with ``sent_at``;
* failure -> ``attempts`` + 1, ``last_error`` and ``last_status`` (``None`` when the peer never answered)
  recorded, ``next_attempt_at = now + min(send_retry_base_s * 2**(attempts-1), send_retry_max_s)``;
* **transient** failures (peer unreachable or refusing the association, no response, time-out, status
  0xA7xx "out of resources") stay ``PENDING`` forever, retried at the capped interval: a PACS down for a
  weekend must not lose results;
* **permanent** refusals (the peer answered another failure status, e.g. 0xA9xx "data set does not
  match SOP class", 0xCxxx "cannot understand", 0x0122 "SOP class not supported") and a missing or
  unreadable outbox file go ``FAILED`` at the ``max_attempts``-th of them (``refusals``; default
  :data:`DEFAULT_MAX_ATTEMPTS`; transient failures before or between them do not count). FAILED rows are kept, listed on the dashboard and by ``medgru outbox
  list`` with their error, and an admin puts them back with :func:`requeue_failed` (the dashboard's
  Resend button, ``medgru outbox resend``).

Several senders (processes) may run at once: an item is claimed by a conditional UPDATE (its
``next_attempt_at`` moved past the send), so only one of them sends it; a sender that dies mid-send
releases it when the claim lease expires, and a service that stops gives its claims back at once
(:meth:`Sender.release_claims`). The lease covers the whole batch (the time-out for every
C-STORE and for each association's set-up and release), and an outcome is written only while the row
still holds this sender's lease: a late one, of a send that outlived its lease while another sender
re-claimed the item, is logged and dropped rather than written over that sender's outcome.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from medgru.settings import Destination, Settings
from medgru.tls import client_context
from storage.models import OutboxItem, OutboxState, utcnow

log = logging.getLogger(__name__)

# --- DIMSE C-STORE statuses (PS3.4 B.2.3, PS3.7 C) ------------------------------------------------
STATUS_SUCCESS = 0x0000
STATUS_WARNING_COERCION = 0xB000  # stored, some elements coerced
STATUS_WARNING_ELEMENTS_DISCARDED = 0xB006  # stored, some elements discarded
STATUS_WARNING_DATASET_MISMATCH = 0xB007  # stored, data set does not match SOP class
STATUS_REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_REFUSED_NOT_AUTHORIZED = 0x0124
STATUS_REFUSED_OUT_OF_RESOURCES = 0xA700  # A7xx
STATUS_ERROR_DATASET_MISMATCH = 0xA900  # A9xx
STATUS_ERROR_CANNOT_UNDERSTAND = 0xC000  # Cxxx
STATUS_PROCESSING_FAILURE = 0x0110
# local pseudo-statuses (outside the 16-bit DIMSE range): no status came from the peer
STATUS_NO_RESPONSE = -1  # association aborted / timed out before the C-STORE response
STATUS_NOT_SENT = -2  # never offered: unreadable file or no accepted presentation context

WARNING_STATUSES = frozenset({STATUS_WARNING_COERCION, STATUS_WARNING_ELEMENTS_DISCARDED,
                              STATUS_WARNING_DATASET_MISMATCH})
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_ATTEMPTS = 10  # for permanent refusals only; transient failures are retried forever
DEFAULT_BATCH = 100  # items per run, across all destinations (one association per destination)
MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association
# a claim lease lasts the sender's time-out once per item, plus this many time-outs per association (TCP
# connection, A-ASSOCIATE answer, the TLS diagnosis of a failure, A-RELEASE), plus a margin for the database
LEASE_TIMEOUTS_PER_ASSOCIATION = 4
LEASE_MARGIN_S = 60.0


def is_success(status: int) -> bool:
    """The peer stored the object: success or one of the C-STORE warning statuses."""
    return status == STATUS_SUCCESS or status in WARNING_STATUSES


def is_transient(status: int | None) -> bool:
    """Worth retrying forever: no answer at all, or the peer is out of resources (A7xx)."""
    return status is None or status in (STATUS_NO_RESPONSE,) or (status & 0xFF00) == STATUS_REFUSED_OUT_OF_RESOURCES


def status_text(status: int | None) -> str:
    if status is None or status == STATUS_NO_RESPONSE:
        return "no C-STORE response (association lost or timed out)"
    if status == STATUS_NOT_SENT:
        return "not sent (no accepted presentation context)"
    if is_success(status):
        return "success" if status == STATUS_SUCCESS else f"warning 0x{status:04X}"
    if (status & 0xFF00) == STATUS_REFUSED_OUT_OF_RESOURCES:
        return f"refused: out of resources (0x{status:04X})"
    if (status & 0xFF00) == STATUS_ERROR_DATASET_MISMATCH:
        return f"error: data set does not match SOP class (0x{status:04X})"
    if (status & 0xF000) == STATUS_ERROR_CANNOT_UNDERSTAND:
        return f"error: cannot understand (0x{status:04X})"
    if status == STATUS_REFUSED_SOP_CLASS_NOT_SUPPORTED:
        return "refused: SOP class not supported (0x0122)"
    if status == STATUS_REFUSED_NOT_AUTHORIZED:
        return "refused: not authorized (0x0124)"
    return f"failure 0x{status:04X}"


class AssociationError(ConnectionError):
    """No association with the peer: unreachable, rejected or aborted during negotiation."""


@dataclass(frozen=True)
class StoreOutcome:
    path: Path
    status: int
    error: str = ""  # empty on success

    @property
    def ok(self) -> bool:
        return is_success(self.status)


def _set_nodelay(event: evt.Event) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # not fatal: the association works without it, only slower
            log.warning("could not set TCP_NODELAY on the association socket: %s", exc)


def _tls_failure(destination: Destination, tls: ssl.SSLContext, timeout: float) -> str | None:
    """Why a TLS handshake with ``destination`` fails (an untrusted certificate, a peer without TLS...),
    or ``None`` when it succeeds or the peer cannot be reached at all. pynetdicom reports a failed
    handshake as a failed connection; this second try names the cause for the outbox's error."""
    try:
        with socket.create_connection((destination.host, destination.port), timeout=timeout) as raw:
            with tls.wrap_socket(raw, server_hostname=destination.host):
                return None
    except ssl.SSLError as exc:
        return str(exc.reason or exc)
    except OSError:
        return None


def _connect_failure(destination: Destination, timeout: float, elapsed: float = 0.0) -> str:
    """Why no TCP connection to ``destination`` could be made, as the operating system says it (refused:
    nothing listens on the port; no route; timed out), for the outbox's error: pynetdicom only logs it.
    ``elapsed``: how long the failed attempt took; one that used up the time-out is not tried again (a
    second wait as long, for the echo check and the dashboard's Check the PACS too)."""
    if elapsed >= timeout:
        return f"no TCP connection within {timeout:g} s"
    try:
        with socket.create_connection((destination.host, destination.port), timeout=timeout - elapsed):
            return "the connection failed, and a second try connected"
    except socket.timeout:
        return f"no TCP connection within {timeout:g} s"
    except OSError as exc:
        return exc.strerror or str(exc)


def _rejection_reason(assoc: Association) -> str:
    """``': <why> (<permanent or transient>)'`` from the peer's A-ASSOCIATE-RJ (PS3.8 9.3.4), or ``''``: a
    PACS that does not know our AE title, one that is not the called AE title and one that is busy must read
    differently in the outbox's error, where an admin looks first."""
    rj = getattr(assoc.acceptor, "primitive", None)
    if rj is None or getattr(rj, "result", None) not in (0x01, 0x02):
        return ""
    try:
        return f": {rj.reason_str[:1].lower()}{rj.reason_str[1:]} ({rj.result_str.lower()})"
    except (AttributeError, KeyError, TypeError, ValueError):  # an unknown source or diagnostic
        return ""


def open_association(destination: Destination, contexts: list, *, calling_ae: str,
                     timeout: float = DEFAULT_TIMEOUT_S, tls: ssl.SSLContext | None = None) -> Association:
    """An established association with ``destination`` proposing ``contexts`` (TCP_NODELAY set; over TLS
    when ``tls`` is given). Raises :class:`AssociationError` naming why there is none: unreachable, a
    failed TLS handshake (with the cause), rejected, aborted or unanswered."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    connected: list[bool] = []

    def on_open(event: evt.Event) -> None:
        connected.append(True)
        _set_nodelay(event)

    started = time.monotonic()
    try:
        assoc = ae.associate(destination.host, destination.port, contexts=contexts,
                             ae_title=destination.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
                             tls_args=None if tls is None else (tls, destination.host))
    except OSError as exc:  # socket.gaierror: the host name does not resolve (a typo in the destination)
        raise AssociationError(f"{destination} unreachable: {exc} (calling AE {calling_ae})") from exc
    if not assoc.is_established:
        tls_failure = _tls_failure(destination, tls, timeout) if tls is not None and not connected else None
        if tls_failure:
            reason = f"TLS with {destination} failed: {tls_failure}"
        elif not connected:
            reason = (f"{destination} unreachable "
                      f"({_connect_failure(destination, timeout, time.monotonic() - started)})")
        elif assoc.is_rejected:
            reason = f"association rejected by {destination}{_rejection_reason(assoc)}"
        elif assoc.is_aborted:
            reason = f"association aborted by {destination}"
        else:
            reason = f"no association answer from {destination} within {timeout:g} s"
        raise AssociationError(f"{reason} (calling AE {calling_ae})")
    return assoc


def _read_header(path: Path) -> tuple[str, str, str]:
    """(SOP Class UID, SOP Instance UID, transfer syntax) of a DICOM file, without its pixel data."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta = ds.file_meta
    sop_class = str(meta.get("MediaStorageSOPClassUID") or ds.SOPClassUID)
    sop_uid = str(meta.get("MediaStorageSOPInstanceUID") or ds.SOPInstanceUID)
    ts = str(meta.get("TransferSyntaxUID") or ExplicitVRLittleEndian)
    return sop_class, sop_uid, ts


def store_files(destination: Destination, paths: Sequence[Path | str], *, calling_ae: str,
                timeout: float = DEFAULT_TIMEOUT_S, tls: ssl.SSLContext | None = None) -> list[StoreOutcome]:
    """C-STORE ``paths`` to ``destination`` over one association; an outcome per path, in order.

    Raises :class:`AssociationError` when no association could be established (nothing was sent).
    Files that cannot be read, or whose SOP class / transfer syntax the peer did not accept, get
    :data:`STATUS_NOT_SENT`; if the association drops mid-way, the rest get :data:`STATUS_NO_RESPONSE`.
    """
    paths = [Path(p) for p in paths]
    outcomes: dict[int, StoreOutcome] = {}
    headers: dict[int, tuple[str, str, str]] = {}
    for i, path in enumerate(paths):
        try:
            headers[i] = _read_header(path)
        except (OSError, pydicom.errors.InvalidDicomError, AttributeError, KeyError) as exc:
            outcomes[i] = StoreOutcome(path, STATUS_NOT_SENT, f"cannot read {path.name}: {exc}")
    if not headers:
        return [outcomes[i] for i in range(len(paths))]

    pairs: dict[str, set[str]] = defaultdict(set)
    for sop_class, _uid, ts in headers.values():
        pairs[sop_class].add(ts)
    contexts = []
    for sop_class, syntaxes in pairs.items():
        offered = list(dict.fromkeys([*sorted(syntaxes), ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        contexts.append(build_context(sop_class, offered))
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} SOP classes in one association; at most {MAX_CONTEXTS}")

    assoc = open_association(destination, contexts, calling_ae=calling_ae, timeout=timeout, tls=tls)
    try:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        accepted_classes = {a for a, _ in accepted}
        for i, path in enumerate(paths):
            if i in outcomes:
                continue
            sop_class, sop_uid, ts = headers[i]
            if not assoc.is_established:
                outcomes[i] = StoreOutcome(path, STATUS_NO_RESPONSE, f"association lost before {sop_uid}")
                continue
            if sop_class not in accepted_classes:
                outcomes[i] = StoreOutcome(path, STATUS_NOT_SENT, f"{destination} accepted no presentation "
                                           f"context for SOP class {sop_class} ({sop_uid})")
                continue
            if (sop_class, ts) not in accepted and UID(ts).is_compressed:
                outcomes[i] = StoreOutcome(path, STATUS_NOT_SENT, f"{destination} did not accept transfer "
                                           f"syntax {ts} for {sop_uid}")
                continue
            ds = pydicom.dcmread(path)
            try:
                rsp = assoc.send_c_store(ds)
            except RuntimeError:  # the association ended since the check above (the peer aborted, a time-out)
                if assoc.is_established:
                    raise
                outcomes[i] = StoreOutcome(path, STATUS_NO_RESPONSE, f"association lost before {sop_uid}")
                continue
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else STATUS_NO_RESPONSE
            error = "" if is_success(status) else f"{sop_uid}: {status_text(status)}"
            if error and rsp is not None and rsp.get("ErrorComment"):
                error += f" ({rsp.ErrorComment})"
            outcomes[i] = StoreOutcome(path, status, error)
            log.info("C-STORE %s to %s: %s", sop_uid, destination, status_text(status))
    finally:
        if assoc.is_established:
            assoc.release()
    return [outcomes[i] for i in range(len(paths))]


def send_files(destination: Destination, paths: Iterable[Path | str], *, calling_ae: str,
               timeout: float = DEFAULT_TIMEOUT_S, tls: ssl.SSLContext | None = None) -> list[int]:
    """C-STORE ``paths`` over one association and return the DIMSE status of each (see the STATUS_*
    constants; negative values are local: :data:`STATUS_NO_RESPONSE`, :data:`STATUS_NOT_SENT`).
    Raises :class:`AssociationError` if no association could be established."""
    return [o.status for o in store_files(destination, list(paths), calling_ae=calling_ae, timeout=timeout,
                                          tls=tls)]


# ------------------------------------------------------------------------------------ the outbox
def backoff_delay(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: base * 2**(attempts-1), capped."""
    if attempts < 1:
        return 0.0
    return float(min(max_s, base_s * (2.0 ** min(attempts - 1, 60))))


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


class Sender:
    """Drains the outbox table to the destination PACS. ``run_once`` for one pass, ``run_forever`` as a
    thread target (``stop_event`` ends it)."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], *,
                 max_attempts: int | None = DEFAULT_MAX_ATTEMPTS, timeout: float = DEFAULT_TIMEOUT_S,
                 batch: int = DEFAULT_BATCH,
                 send: Callable[..., list[StoreOutcome]] = store_files) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.batch = batch
        self._send = send
        self._tls = client_context(settings)
        self._lease_until: datetime | None = None  # the lease of the pass in flight (release_claims)

    # --- one pass ----------------------------------------------------------------------------
    def run_once(self, now: datetime | None = None) -> int:
        """Send every due PENDING item once; return how many were stored by the peer and recorded SENT
        (not those whose late outcome was dropped because another sender had re-claimed them)."""
        now = _aware(now or utcnow())
        groups, lease_until = self._claim_due(now)
        sent = 0
        self._lease_until = lease_until if groups else None
        try:
            for destination_text, items in groups.items():
                sent += self._send_group(destination_text, items, now, lease_until)
        finally:
            self._lease_until = None
        return sent

    def release_claims(self, now: datetime | None = None) -> int:
        """Give back the items that the pass in flight has claimed and whose outcome it has not written yet,
        due at ``now``; returns how many. The service calls it when it stops: a pass cut short by a restart
        would otherwise hold them until its lease ends, up to an hour for a full batch of a slow peer. The
        pass's own outcome for them, should it still come, is then dropped (:meth:`_send_group`), and the
        next sender stores them again (a PACS takes a second copy of an instance it has)."""
        lease_until = self._lease_until
        if lease_until is None:
            return 0
        now = _aware(now or utcnow())
        with self.session_factory() as session:
            n = session.execute(
                update(OutboxItem)
                .where(OutboxItem.state == OutboxState.PENDING, OutboxItem.next_attempt_at == lease_until)
                .values(next_attempt_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            session.commit()
        if n:
            log.warning("released %d outbox items claimed by the send in flight; they are due again", n)
        return n

    def _claim_due(self, now: datetime) -> tuple[dict[str, list[tuple[int, str, str]]], datetime]:
        """Due items grouped by destination, each claimed by this sender ({dest: [(id, path, uid)]}), and
        the claim's lease: the ``next_attempt_at`` the claimed rows hold until their outcome is written."""
        default_dest = str(self.settings.destination) if self.settings.destination is not None else ""
        groups: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
        due = select(OutboxItem.id, OutboxItem.destination, OutboxItem.next_attempt_at, OutboxItem.path,
                     OutboxItem.sop_instance_uid).where(OutboxItem.state == OutboxState.PENDING,
                                                        OutboxItem.next_attempt_at <= now)
        if not default_dest:
            # items without a destination (no route for their calling AE) wait, untouched, until one is
            # configured; filtered here, not after the LIMIT, or older ones would fill every batch and
            # starve the routed items behind them
            due = due.where(OutboxItem.destination != "")
        with self.session_factory() as session:
            rows = session.execute(
                due.order_by(OutboxItem.next_attempt_at, OutboxItem.id).limit(self.batch)
            ).all()
            # the groups are sent one after the other, so the last one's items wait for all of the
            # batch: one lease for the batch, long enough for every C-STORE and association in it
            destinations = {dest or default_dest for _id, dest, _due, _path, _uid in rows}
            lease_until = now + timedelta(seconds=self.timeout * (
                len(rows) + LEASE_TIMEOUTS_PER_ASSOCIATION * len(destinations)) + LEASE_MARGIN_S)
            for item_id, dest, due_at, path, uid in rows:
                dest = dest or default_dest
                claimed = session.execute(
                    update(OutboxItem)
                    .where(OutboxItem.id == item_id, OutboxItem.state == OutboxState.PENDING,
                           OutboxItem.next_attempt_at == due_at)
                    .values(next_attempt_at=lease_until, destination=dest)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if claimed == 1:
                    groups[dest].append((item_id, path, uid))
            session.commit()
        return groups, lease_until

    def _send_group(self, destination_text: str, items: list[tuple[int, str, str]], now: datetime,
                    lease_until: datetime) -> int:
        paths = [self.settings.outbox_dir / path for _id, path, _uid in items]
        try:
            destination = Destination.parse(destination_text)
            outcomes = self._send(destination, paths, calling_ae=self.settings.ae_title, timeout=self.timeout,
                                  tls=self._tls)
        except (AssociationError, OSError, ValueError) as exc:
            log.warning("sending %d objects to %s failed: %s", len(items), destination_text, exc)
            outcomes = [StoreOutcome(p, STATUS_NO_RESPONSE, str(exc)) for p in paths]
            association_failed = True
        else:
            association_failed = False
        sent = 0
        with self.session_factory() as session:
            for (item_id, _path, uid), outcome in zip(items, outcomes):
                item = session.get(OutboxItem, item_id)
                if item is None:  # deleted meanwhile (a re-run replaced it): nothing to record
                    continue
                retry_in: float | None = None
                if outcome.ok:
                    values: dict[str, object] = {"state": OutboxState.SENT, "sent_at": now,
                                                 "last_status": outcome.status, "last_error": "",
                                                 "attempts": item.attempts + 1}
                else:
                    values, retry_in = self._failure_values(item, outcome, now, association_failed)
                # written only while the row still holds our claim: if the send outlived the lease,
                # another sender may have re-claimed it, stored it and recorded its own outcome
                written = session.execute(
                    update(OutboxItem)
                    .where(OutboxItem.id == item_id, OutboxItem.state == OutboxState.PENDING,
                           OutboxItem.next_attempt_at == lease_until)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if written != 1:
                    log.warning("outbox item %d (%s): outcome of the send to %s (%s) dropped; its claim "
                                "was released (the service stopping) or expired, and another sender may have "
                                "re-claimed it", item_id, uid, destination_text, status_text(outcome.status))
                elif outcome.ok:
                    sent += 1
                else:
                    self._log_failure(item, values, retry_in)
            session.commit()
        return sent

    def _failure_values(self, item: OutboxItem, outcome: StoreOutcome, now: datetime,
                        association_failed: bool) -> tuple[dict[str, object], float | None]:
        """The columns a failed attempt on ``item`` writes (attempts + 1, its status and error, and either
        FAILED, at the ``max_attempts``-th permanent refusal, or the next try after the back-off) and the
        back-off delay in seconds, ``None`` when FAILED. Attempts that never reached the peer (an outage)
        do not count towards ``max_attempts``: only refusals do (``refusals``)."""
        attempts = item.attempts + 1
        status = None if outcome.status == STATUS_NO_RESPONSE or association_failed else outcome.status
        missing_file = outcome.status == STATUS_NOT_SENT and not Path(outcome.path).is_file()
        error = (f"file {outcome.path.name} missing from the outbox" if missing_file
                 else outcome.error or status_text(status))[:4000]
        values: dict[str, object] = {"attempts": attempts, "last_status": status, "last_error": error}
        permanent = not association_failed and not is_transient(status)
        if permanent:
            values["refusals"] = (item.refusals or 0) + 1
            if self.max_attempts is not None and values["refusals"] >= self.max_attempts:
                values["state"] = OutboxState.FAILED
                return values, None
        delay = backoff_delay(attempts, self.settings.send_retry_base_s, self.settings.send_retry_max_s)
        values["next_attempt_at"] = now + timedelta(seconds=delay)
        return values, delay

    @staticmethod
    def _log_failure(item: OutboxItem, values: dict[str, object], retry_in: float | None) -> None:
        """Log a failed attempt once its outcome is written (``retry_in`` ``None``: it went FAILED)."""
        if retry_in is None:
            log.error("outbox item %d (%s) FAILED after %d refusals (%d attempts) by %s: %s; kept for an admin",
                      item.id, item.sop_instance_uid, values["refusals"], values["attempts"], item.destination,
                      values["last_error"])
            return
        log.warning("outbox item %d (%s) attempt %d to %s failed: %s; next try in %.0f s",
                    item.id, item.sop_instance_uid, values["attempts"], item.destination, values["last_error"],
                    retry_in)

    # --- forever -----------------------------------------------------------------------------
    def run_forever(self, stop_event: threading.Event, interval_s: float = 1.0) -> None:
        """Call :meth:`run_once` every ``interval_s`` until ``stop_event`` is set. Errors of one pass
        (database unreachable...) are logged and the loop goes on."""
        log.info("sender started (destination %s)", self.settings.destination or "(none configured)")
        from storage.db import PassLog

        passes = PassLog(log, "sender pass")
        while not stop_event.is_set():
            try:
                self.run_once()
            except Exception as exc:  # one bad pass must not end the thread; the items stay in the table
                passes.failed(exc, interval_s)
            else:
                passes.succeeded()
            stop_event.wait(interval_s)
        log.info("sender stopped")


def requeue_failed(session_factory: sessionmaker[Session], item_ids: Iterable[int] | None = None,
                   now: datetime | None = None) -> int:
    """Admin action: put FAILED items (all, or ``item_ids``) back to PENDING, due now, attempts reset.
    Returns how many were requeued."""
    now = _aware(now or utcnow())
    stmt = update(OutboxItem).where(OutboxItem.state == OutboxState.FAILED)
    if item_ids is not None:
        stmt = stmt.where(OutboxItem.id.in_(list(item_ids)))
    with session_factory() as session:
        n = session.execute(stmt.values(state=OutboxState.PENDING, next_attempt_at=now, attempts=0, refusals=0)
                            .execution_options(synchronize_session=False)).rowcount
        session.commit()
    return int(n or 0)
