"""Checking a destination before results go there: ``medgru echo``.

A PACS admin's first question after setting ``MEDGRU_DESTINATION`` is "can the worker reach the PACS, and
will the PACS take what the worker sends?". A C-ECHO alone answers the first half: a PACS can answer
Verification and still refuse the SR's SOP class, and then every result goes FAILED after its attempts.
:func:`verify_destination` therefore opens ONE association proposing Verification and each SOP class the
worker sends (:data:`RESULT_SOP_CLASSES`, with the transfer syntaxes the sender offers), sends a C-ECHO,
and reports the echo status, its round trip and which result classes the peer accepted. It uses the same
calling AE, TLS context and association code as the sender (:func:`dispatch.sender.open_association`), so
what it reports is what the sender will meet.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from dispatch.sender import DEFAULT_TIMEOUT_S, STATUS_SUCCESS, AssociationError, open_association
from medgru.settings import Destination

#: The SOP classes of the objects the worker sends (reporting.sr: Comprehensive 3D SR; reporting.sc:
#: Secondary Capture Image), each offered as the sender offers it.
RESULT_SOP_CLASSES: tuple[UID, ...] = (Comprehensive3DSRStorage, SecondaryCaptureImageStorage)
#: reporting.kos: the rejection note of results a revision replaced, sent where settings ask for it
REJECTION_NOTE_SOP_CLASS = KeyObjectSelectionDocumentStorage


def result_sop_classes(settings) -> tuple[UID, ...]:
    """The SOP classes the worker sends with ``settings``: the SR and SC, and the rejection note's where
    ``reject_revised_results`` is on."""
    extra = (REJECTION_NOTE_SOP_CLASS,) if getattr(settings, "reject_revised_results", False) else ()
    return RESULT_SOP_CLASSES + extra
_OFFERED_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def echo_status_text(status: int | None) -> str:
    if status is None:
        return "no response (association lost or timed out)"
    return "success (0x0000)" if status == STATUS_SUCCESS else f"failure 0x{status:04X}"


@dataclass
class EchoReport:
    """What one check of a destination found. ``ok``: the echo succeeded and every result class was
    accepted; ``error`` says why not (empty when ok)."""

    destination: Destination
    calling_ae: str
    tls: bool
    echoed: bool = False  # a C-ECHO was sent (the peer accepted Verification)
    echo_status: int | None = None  # None: no C-ECHO response
    round_trip_s: float | None = None
    accepted: dict[str, str | None] = field(default_factory=dict)  # SOP class name -> transfer syntax name
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def lines(self) -> list[str]:
        """A human-readable account, one fact per line."""
        out = [f"{self.destination} (calling AE {self.calling_ae}, TLS {'on' if self.tls else 'off'})"]
        if self.echoed:
            took = f" in {self.round_trip_s * 1000:.0f} ms" if self.round_trip_s is not None else ""
            out.append(f"C-ECHO: {echo_status_text(self.echo_status)}{took}")
        for name, syntax in self.accepted.items():
            out.append(f"{name}: " + (f"accepted ({syntax})" if syntax else "NOT accepted"))
        out.append("OK: results can be sent" if self.ok else f"FAILED: {self.error}")
        return out


def verify_destination(destination: Destination, *, calling_ae: str, timeout: float = DEFAULT_TIMEOUT_S,
                       tls: ssl.SSLContext | None = None,
                       sop_classes: tuple[UID, ...] = RESULT_SOP_CLASSES) -> EchoReport:
    """Associate with ``destination``, C-ECHO it and see which of ``sop_classes`` (the results') it accepts."""
    report = EchoReport(destination=destination, calling_ae=calling_ae, tls=tls is not None)
    contexts = [build_context(Verification)]
    contexts += [build_context(uid, _OFFERED_SYNTAXES) for uid in sop_classes]
    try:
        assoc = open_association(destination, contexts, calling_ae=calling_ae, timeout=timeout, tls=tls)
    except AssociationError as exc:
        report.error = str(exc)
        return report
    try:
        accepted = {str(cx.abstract_syntax): UID(cx.transfer_syntax[0]).name for cx in assoc.accepted_contexts}
        report.echoed = str(Verification) in accepted
        if report.echoed:
            started = time.perf_counter()
            rsp = assoc.send_c_echo()
            if rsp is not None and "Status" in rsp:
                report.echo_status = int(rsp.Status)
                report.round_trip_s = time.perf_counter() - started
    finally:
        if assoc.is_established:
            assoc.release()
    report.accepted = {uid.name: accepted.get(str(uid)) for uid in sop_classes}
    refused = [name for name, syntax in report.accepted.items() if syntax is None]
    if not report.echoed:
        report.error = f"{destination} did not accept Verification (C-ECHO)"
    elif report.echo_status != STATUS_SUCCESS:
        report.error = f"C-ECHO: {echo_status_text(report.echo_status)}"
    elif refused:
        report.error = (f"{destination} accepts no presentation context for {', '.join(refused)}: "
                        "those results would fail")
    return report


def configured_peers(settings) -> list[tuple[str, Destination]]:
    """The peers results go to, each with what sends there: the destination, then each route's peer
    (one entry per peer, its labels joined: ``"destination, route of CARDIO"``)."""
    peers: dict[str, tuple[str, Destination]] = {}
    if settings.destination is not None:
        peers[str(settings.destination)] = ("destination", settings.destination)
    for calling_ae, routed in settings.routes.items():
        key = str(routed)
        earlier = peers[key][0] + ", " if key in peers else ""
        peers[key] = (earlier + f"route of {calling_ae}", routed)
    return list(peers.values())


def verify_configured(settings, timeout: float = 10.0) -> list[tuple[str, EchoReport]]:
    """:func:`verify_destination` for each of :func:`configured_peers`, with our AE title and TLS settings."""
    from medgru.tls import client_context

    tls = client_context(settings)
    return [(why, verify_destination(peer, calling_ae=settings.ae_title, timeout=timeout, tls=tls,
                                     sop_classes=result_sop_classes(settings)))
            for why, peer in configured_peers(settings)]
