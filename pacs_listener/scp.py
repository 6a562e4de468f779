"""The DICOM listener: Verification + Storage SCP.

``Listener(settings, session_factory, on_stored=None)``; ``start()`` returns at once (pynetdicom runs
the server in its own thread, one thread per association), ``stop()`` shuts it down, ``port`` is the
bound port (``settings.listen_port`` 0 picks a free one).

Accepted: Verification, every standard storage SOP class pynetdicom knows, the retired storage SOP
classes of pydicom's UID dictionary, and private storage SOP classes proposed by the peer (added to
that association's supported contexts when it is requested), each with every transfer syntax in
:data:`TRANSFER_SYNTAXES`. Associations must be addressed to ``settings.ae_title`` (called AE title,
rejected with reason 7 otherwise) and, when ``settings.allowed_calling_aes`` is not empty, come from one
of those calling AE titles (rejected with reason 3, "calling AE title not recognised").

C-STORE: validate → (failure: quarantine + failure status) → atomic durable spool write → database
record + commit → Success. Any error while storing answers a failure status and the bytes go to the
quarantine with the reason; we never answer Success for an instance that is not both on disk and
committed. A resent SOP Instance UID is answered Success and replaces nothing (see ``ingest``).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
import sqlite3
import socket
import ssl
import threading
import time
from collections.abc import Callable
from io import BytesIO
from dataclasses import replace
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    UID_dictionary,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEG2000MC,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt, register_uid
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, _STORAGE_CLASSES
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from medgru.logsafe import install as install_log_redaction, instance_context
from medgru.settings import Settings
from medgru.tls import server_context
from pacs_listener.ingest import InstanceMeta, extract_meta, find_instance, record_instance
from pacs_listener.spool import (
    QuarantineReason,
    clean_temp_files,
    spool_relpath,
    write_quarantine,
    write_spool,
    write_spool_new,
)
from pacs_listener.status import StoreStatus, describe
from pacs_listener.validate import InvalidDataset, RequestIds, is_valid_uid, validate_received
from storage.db import PassLog, error_line
from storage.models import Instance, QuarantineItem

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    JPEG2000MCLossless,
    JPEG2000MC,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
)

_DB_ATTEMPTS = 4
_register_lock = threading.Lock()


def _register_storage_class(uid: str, keyword: str) -> None:
    """Make pynetdicom route C-STORE for ``uid`` to its Storage service class (idempotent)."""
    with _register_lock:
        if uid not in _STORAGE_CLASSES.values():
            register_uid(uid, keyword, StorageServiceClass)


def storage_sop_classes() -> list[str]:
    """Every storage SOP class we accept: pynetdicom's, plus the retired ones pydicom names."""
    uids = [cx.abstract_syntax for cx in AllStoragePresentationContexts]
    known = set(uids)
    for uid, (name, kind, _info, retired, keyword) in UID_dictionary.items():
        if kind != "SOP Class" or uid in known or "Storage" not in name or "Commitment" in name:
            continue
        if "Directory" in name:  # DICOMDIR is a media object, never sent by C-STORE
            continue
        if not keyword.isidentifier():
            continue
        _register_storage_class(uid, keyword)
        uids.append(uid)
        known.add(uid)
    return uids


def supported_contexts() -> list[PresentationContext]:
    contexts = [build_context(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian])]
    contexts += [build_context(uid, list(TRANSFER_SYNTAXES)) for uid in storage_sop_classes()]
    return contexts


#: connections the kernel holds for the listener until its accepting thread takes them. socketserver's
#: default, 5, is fewer than the associations served at once: the kernel dropped the rest of a burst of
#: connections, whose TCP handshakes were tried again only after 1 s, then 3 s, 7 s...
LISTEN_BACKLOG = 128

#: the listener logs a disk refusal at most this often (a PACS retrying a study sends many instances)
DISK_WARNING_INTERVAL_S = 60.0



def differs_from_stored(stored: Path, data: bytes, received: Dataset, transfer_syntax_uid: str) -> bool:
    """Whether a resent instance (``data``, parsed as ``received``) differs from its stored copy: the same
    bytes, else element by element (:func:`_content`; the file meta group aside: another sender writes
    another implementation UID). Copies in different transfer syntaxes are taken as the same (one re-encoded: telling would need
    both decoded); so is a stored copy that cannot be read (the first copy stays in use either way)."""
    try:
        stored_bytes = stored.read_bytes()
        if stored_bytes == data:
            return False
        old = dcmread(BytesIO(stored_bytes))
    except Exception as exc:  # noqa: BLE001 - logged; the resend is then taken as the same
        log.warning("stored copy %s could not be read to compare it with a resend: %s", stored.name, error_line(exc))
        return False
    if str(old.file_meta.get("TransferSyntaxUID", "")) != str(transfer_syntax_uid):
        return False
    return _content(old) != _content(received)


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


#: Data Set Trailing Padding: bytes after the data set, no content
_TRAILING_PADDING = 0xFFFCFFFC


def _content(ds: Dataset) -> dict:
    """The elements of ``ds`` that carry content: group lengths (gggg,0000) and trailing padding, which an
    encoder adds or leaves out, aside."""
    return {tag: ds[tag] for tag in ds.keys() if tag.element != 0 and tag != _TRAILING_PADDING}

def disk_short(folder: Path, min_free_mb: float) -> str | None:
    """Why ``folder``'s disk has too little room (``None`` when it has at least ``min_free_mb`` free, or the
    check is off at 0)."""
    if min_free_mb <= 0:
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return f"free space of {folder} unknown: {exc}"
    if free < min_free_mb * 1e6:
        return f"{free / 1e6:.0f} MB free on the spool's disk, below min_free_disk_mb {min_free_mb:g}"
    return None


#: the errno of a write refused for want of room: the disk full, the user's quota used up
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: PostgreSQL's SQLSTATE class 53, "insufficient resources" (53100: disk full, 53200: out of memory...)
PG_INSUFFICIENT_RESOURCES = "53"


def out_of_room(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it wraps, says that a disk or the database is full: an ``OSError`` of
    no room, SQLite's SQLITE_FULL ("database or disk is full"), a PostgreSQL error of class 53. Never raises."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_ROOM_ERRNOS:
            return True
        if isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if str(getattr(e, "sqlstate", None) or getattr(e, "pgcode", None) or "").startswith(PG_INSUFFICIENT_RESOURCES):
            return True
        todo += [getattr(e, "orig", None), e.__cause__, e.__context__]
    return False


def readable_study_series(data: bytes) -> dict[str, str] | None:
    """The Study and Series Instance UIDs of a refused instance, where its header still reads and they are
    valid UIDs (so that an admin knows which series lost it); ``None`` otherwise. Never raises."""
    from io import BytesIO

    from pydicom import dcmread

    try:
        ds = dcmread(BytesIO(data), force=True, stop_before_pixels=True,
                     specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
        uids = {"study_uid": str(ds.get("StudyInstanceUID", "")), "series_uid": str(ds.get("SeriesInstanceUID", ""))}
    except Exception as exc:  # a header too broken to read: the quarantine record keeps the request's UIDs
        log.debug("no study / series UID readable from a refused instance: %s", type(exc).__name__)
        return None
    return {k: (v if is_valid_uid(v) else "") for k, v in uids.items()}


def _handshake_in_connection_thread(server, tls: ssl.SSLContext) -> None:
    """Make the server do each TLS handshake in that connection's own thread, within the ACSE time-out, and
    log a failed one with the peer's address and the reason (a plain-TCP peer, an untrusted or missing
    certificate, a peer silent for the time-out).

    pynetdicom's server (``socketserver``) wraps the accepted socket in its accepting thread, with no
    time-out: one peer that connected and sent nothing (a port check, a stalled client) held that thread,
    and no other association was accepted until it hung up. It also drops a refused handshake without a
    word, which leaves an admin nothing to go on when a modality cannot send.

    A handshake still under way when the server closes is ended then: the server's close waits for its
    connection threads, and a silent peer held the listener's stop (``medgru serve``'s) for the whole
    time-out, a peer trickling its handshake byte by byte for longer."""
    timeout = server.ae.acse_timeout
    serve_connection = server.process_request_thread
    close_server = server.server_close
    handshaking: set[socket.socket] = set()  # connections whose handshake is under way
    lock = threading.Lock()
    closed = threading.Event()

    def get_request():
        client, address = server.socket.accept()  # a plain socket; its handshake is done by process_request_thread
        with lock:
            handshaking.add(client)
        return client, address

    def process_request_thread(client, address):
        if isinstance(client, ssl.SSLSocket):  # accepted by pynetdicom's own get_request before this was set
            serve_connection(client, address)
            return
        secure = None
        try:
            client.settimeout(timeout)
            secure = tls.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
            with lock:
                handshaking.discard(client)
                handshaking.add(secure)
                stopping = closed.is_set()
            if stopping:
                raise ConnectionAbortedError("the listener stops")
            secure.do_handshake()
            secure.settimeout(None)  # blocking, as the accepted socket of a plain-TCP association
        except OSError as exc:  # ssl.SSLError, a reset during the handshake, a time-out
            if closed.is_set():
                log.info("TLS handshake with %s:%s ended: the listener stops", address[0], address[1])
            else:
                log.warning("TLS handshake with %s:%s refused: %s", address[0], address[1],
                            getattr(exc, "reason", None) or exc)
            (secure or client).close()
            return
        finally:
            with lock:
                handshaking.discard(client)
                handshaking.discard(secure)
        serve_connection(secure, address)

    def server_close():
        with lock:
            closed.set()
            pending = list(handshaking)
        for sock in pending:  # the plain socket's shutdown: ends the handshake's read in its thread
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        close_server()

    server.get_request = get_request
    server.process_request_thread = process_request_thread
    server.server_close = server_close


#: what a PDU may carry beyond the largest request: PDU and PDV headers, a command set
PDU_OVERHEAD_BYTES = 2**20


def _bound_received_bytes(assoc, limit: int) -> None:
    """Abort ``assoc`` once its peer has sent more than ``limit`` bytes towards one DIMSE message (and the
    complete ones still waiting for the association to take them), or declares a PDU longer than that.

    pynetdicom gathers a request's command and data set fragments in memory until the last one arrives, and
    reads each PDU whole, of whatever length its header declares: a peer that sent P-DATA that never
    completed a message, or one huge PDU, grew the service's memory for as long as it kept sending (seen:
    300 MB of data set fragments, 300 MB more resident, kept after the connection closed). The association is
    aborted (A-ABORT, as pynetdicom does for an invalid message) and what was gathered is dropped."""
    dimse, dul = assoc.dimse, assoc.dul
    receive_primitive = dimse.receive_primitive
    asock = dul.socket
    recv = asock.recv
    state = {"bytes": 0, "refused": False}

    def refuse(what: str) -> None:
        state["refused"] = True
        message = dimse.message
        command = getattr(message, "command_set", None)
        sop_uid = str(getattr(command, "AffectedSOPInstanceUID", "") or "") if command is not None else ""
        log.warning("association from %s:%s (calling AE %r) aborted: %s, more than max_instance_mb %g%s",
                    assoc.requestor.address, assoc.requestor.port, str(assoc.requestor.ae_title).strip(), what,
                    limit / 2**20, f" (C-STORE {sop_uid})" if sop_uid else "")
        dimse.message = None  # what was gathered goes

    def receive_bounded(primitive) -> None:
        if state["refused"]:
            return
        # the previous message was complete and the association has taken it: a new one starts. A complete
        # request still waiting in msg_queue keeps counting: a peer that sends requests without waiting for
        # their answers (beyond the one operation at a time negotiated) had them all held in memory
        if dimse.message is None and dimse.msg_queue.empty():
            state["bytes"] = 0
        state["bytes"] += sum(len(data) for _cx, data in primitive.presentation_data_value_list or [])
        if state["bytes"] > limit:
            refuse(f"requests not yet answered already {state['bytes']} bytes long")
            dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT to the peer, A-P-ABORT to the association
            return
        receive_primitive(primitive)

    def recv_bounded(nr_bytes: int):
        if nr_bytes > limit + PDU_OVERHEAD_BYTES:
            refuse(f"a PDU of {nr_bytes} bytes")
            return bytearray()  # read as a PDU cut short: the connection is closed
        return recv(nr_bytes)

    dimse.receive_primitive = receive_bounded
    asock.recv = recv_bounded


class Listener:
    """The Verification + Storage SCP of the service."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        on_stored: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.on_stored = on_stored
        self.spool_dir = Path(settings.spool_dir)
        self.quarantine_dir = Path(settings.quarantine_dir)
        #: quarantined files whose row the database refused (away): written by run_quarantine_recorder
        self._unrecorded_quarantine: set[str] = set()
        self._unrecorded_lock = threading.Lock()
        self._server = None
        self._ae: AE | None = None
        self._last_disk_warning = -DISK_WARNING_INTERVAL_S

    # lifecycle ----------------------------------------------------------------------------------
    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.supported_contexts = supported_contexts()
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.settings.allowed_calling_aes)
        ae.maximum_associations = 16
        ae.maximum_pdu_size = 0  # accept whatever PDU size the sender uses (fewer, larger PDUs)
        return ae

    def start(self) -> None:
        """Bind and serve in background threads; returns once the socket listens."""
        if self._server is not None:
            raise RuntimeError("listener already started")
        install_log_redaction()
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.spool_dir, self.quarantine_dir):
            removed = clean_temp_files(folder)
            if removed:
                log.warning("removed %d partial files left in %s by an interrupted write", removed, folder)
        self._ae = self._build_ae()
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        tls = server_context(self.settings)
        self._server = self._ae.start_server(
            (self.settings.listen_host, self.settings.listen_port), block=False, evt_handlers=handlers,
            ssl_context=tls,
        )
        self._server.socket.listen(LISTEN_BACKLOG)
        if tls is not None:
            _handshake_in_connection_thread(self._server, tls)
        log.info(
            "DICOM listener %s listening on %s:%d%s (allowed calling AEs: %s)",
            self.settings.ae_title,
            self.settings.listen_host,
            self.port,
            " over TLS, peer certificates required" if tls is not None else "",
            ",".join(self.settings.allowed_calling_aes) or "any",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None
        log.info("DICOM listener %s stopped", self.settings.ae_title)

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("listener not started")
        return int(self._server.server_address[1])

    @property
    def active_associations(self) -> list:
        return [] if self._ae is None else list(self._ae.active_associations)

    def __enter__(self) -> "Listener":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # event handlers -----------------------------------------------------------------------------
    def _on_conn_open(self, event) -> None:
        """TCP_NODELAY, and the association's network time-out on the accepted socket itself.

        socket.accept() hands out a blocking socket without a time-out, and pynetdicom reads a PDU whole
        once its 6-byte header is in: a peer that sent a PDU header (an A-ASSOCIATE-RQ or a P-DATA) and
        then nothing held that association's thread in recv() for as long as it kept the connection open;
        the network time-out fired but could not end it, and 16 such connections from one host shut every
        other sender out (rejected, local limit exceeded) until it hung up. With the time-out on the
        socket, a read or a write that waits longer ends the connection."""
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(event.assoc.network_timeout)
        _bound_received_bytes(event.assoc, int(self.settings.max_instance_mb * 2**20))

    @staticmethod
    def _on_requested(event) -> None:
        """Accept private storage SOP classes the peer proposes (added to this association only)."""
        assoc = event.assoc
        proposed = assoc.requestor.primitive.presentation_context_definition_list or []
        supported = {cx.abstract_syntax for cx in assoc.acceptor.supported_contexts}
        extra = []
        for cx in proposed:
            uid = UID(str(cx.abstract_syntax))
            if uid in supported or not uid.is_private or not is_valid_uid(str(uid)):
                continue
            _register_storage_class(str(uid), "PrivateStorage_" + str(uid).replace(".", "_"))
            extra.append(build_context(uid, list(TRANSFER_SYNTAXES)))
            supported.add(uid)
        if extra:
            log.info("accepting private SOP classes %s from %s", [c.abstract_syntax for c in extra],
                     assoc.requestor.ae_title)
            assoc.acceptor.supported_contexts = list(assoc.acceptor.supported_contexts) + extra

    #: (source, diagnostic) of an A-ASSOCIATE-RJ (PS3.8 9.3.4) as an admin reads it
    _REJECT_REASONS = {
        (1, 2): "application context name not supported",
        (1, 3): "calling AE title not allowed (MEDGRU_ALLOWED_CALLING_AES)",
        (1, 7): "called AE title is not ours (MEDGRU_AE_TITLE)",
        (2, 2): "protocol version not supported",
        (3, 2): "too many associations at once",
    }

    @classmethod
    def _on_rejected(cls, event) -> None:
        """One warning line per rejected association, naming the peer, both AE titles and why: without it a
        PACS configured with the wrong AE title is refused and nothing on our side says so."""
        assoc = event.assoc
        rj = getattr(assoc.acceptor, "primitive", None)
        key = (getattr(rj, "result_source", None), getattr(rj, "diagnostic", None))
        requestor = assoc.requestor
        log.warning("association from %s:%s rejected: calling AE %r, called AE %r: %s",
                    requestor.address, requestor.port, str(requestor.ae_title).strip(),
                    str(getattr(requestor.primitive, "called_ae_title", "") or "").strip(),
                    cls._REJECT_REASONS.get(key, f"source {key[0]}, reason {key[1]}"))

    @staticmethod
    def _on_echo(event) -> int:
        return StoreStatus.SUCCESS

    def _on_store(self, event) -> int:
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        request = RequestIds(
            sop_class_uid=str(event.request.AffectedSOPClassUID or ""),
            sop_instance_uid=str(event.request.AffectedSOPInstanceUID or ""),
            transfer_syntax_uid=str(event.context.transfer_syntax),
        )
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:
            log.exception("C-STORE of %s from %s: the received data set cannot be read back",
                          request.sop_instance_uid, calling_ae)
            return StoreStatus.PROCESSING_FAILURE
        return self.store(data, request, calling_ae)

    # the storage path (public so that it can be driven without a network in tests) ------------
    def store(self, data: bytes, request: RequestIds, calling_ae: str = "") -> int:
        """Validate, spool, record; returns the DIMSE status to answer. pydicom's warnings on the way name
        the instance and quote no values (:mod:`medgru.logsafe`). While the spool's disk has less than
        ``settings.min_free_disk_mb`` free, nothing is written and the answer is 0xA700 (out of resources),
        which a PACS retries later: the database, logs and results need the rest of the disk."""
        short = disk_short(self.spool_dir, self.settings.min_free_disk_mb)
        if short:
            now = time.monotonic()
            if now - self._last_disk_warning > DISK_WARNING_INTERVAL_S:
                self._last_disk_warning = now
                log.error("C-STORE %s from %s refused (out of resources): %s", request.sop_instance_uid,
                          calling_ae, short)
            return StoreStatus.OUT_OF_RESOURCES
        with instance_context(str(request.sop_instance_uid)):
            return self._store(data, request, calling_ae)

    def _store(self, data: bytes, request: RequestIds, calling_ae: str) -> int:
        try:
            ds = validate_received(data, request)
        except InvalidDataset as exc:
            return self._quarantine(data, request, calling_ae, exc.reason, exc.status,  # a bomb is not parsed
                                    ds_uids=None if exc.costly else readable_study_series(data))
        except Exception as exc:  # a validator bug must not lose the instance or answer Success
            log.exception("validation of %s crashed", request.sop_instance_uid)
            return self._quarantine(data, request, calling_ae, f"validation error: {exc!r}",
                                    StoreStatus.PROCESSING_FAILURE)

        try:
            meta = extract_meta(ds, request.transfer_syntax_uid)
            rel_path = spool_relpath(meta.study_uid, meta.series_uid, meta.sop_instance_uid)
        except Exception as exc:
            log.exception("metadata of %s cannot be extracted", request.sop_instance_uid)
            return self._quarantine(data, request, calling_ae, f"metadata extraction failed: {exc!r}",
                                    StoreStatus.PROCESSING_FAILURE, ds_uids=None)

        uids = dict(study_uid=meta.study_uid, series_uid=meta.series_uid)
        try:
            stored_path = self._stored_path(meta)
        except Exception as exc:
            log.exception("C-STORE %s: database lookup failed", meta.sop_instance_uid)
            return self._quarantine(data, request, calling_ae, f"database lookup failed: {exc!r}",
                                    StoreStatus.PROCESSING_FAILURE, ds_uids=uids)
        if stored_path is not None:
            # a resend: the first copy wins; only restore its file if it went missing
            if not (self.spool_dir / stored_path).is_file():
                try:
                    write_spool(self.spool_dir, stored_path, data)
                except OSError as exc:
                    return self._quarantine(data, request, calling_ae, f"spool write failed: {exc}",
                                            StoreStatus.OUT_OF_RESOURCES, ds_uids=uids)
                self._describe_restored(meta, data)
                log.warning("C-STORE %s: recorded but its file %s was missing (or removed by retention); "
                            "restored from this resend", meta.sop_instance_uid, stored_path)
            elif differs_from_stored(self.spool_dir / stored_path, data, ds, request.transfer_syntax_uid):
                # the first copy is kept and used (as a PACS keeps it by default); the other content is not
                # lost nor passed over in silence: kept in quarantine (once), answered Success
                if self._kept_aside_already(meta.sop_instance_uid, data):
                    log.info("C-STORE %s (series %s) from %s: this other copy is kept in quarantine already",
                             meta.sop_instance_uid, meta.series_uid, calling_ae)
                    return StoreStatus.SUCCESS
                return self._quarantine(
                    data, request, calling_ae, "a second copy of an instance already stored, with other "
                    "content (the same SOP Instance UID must mean the same data): the first copy is kept and "
                    "used; this one was answered Success and is kept here", StoreStatus.SUCCESS, ds_uids=uids)
            log.info("C-STORE %s (series %s) from %s: already stored, kept the first copy",
                     meta.sop_instance_uid, meta.series_uid, calling_ae)
            return StoreStatus.SUCCESS

        path = self.spool_dir / rel_path
        try:
            published = write_spool_new(self.spool_dir, rel_path, data)
        except OSError as exc:
            log.error("C-STORE %s (series %s): spool write failed: %s", meta.sop_instance_uid, meta.series_uid, exc)
            return self._quarantine(data, request, calling_ae, f"spool write failed: {exc}",
                                    StoreStatus.OUT_OF_RESOURCES, ds_uids=uids)
        kept, kept_meta = data, meta
        if not published:
            # Another copy of this instance reached its path after our look-up: a concurrent association's
            # (committed by now, or about to be), or one left unrecorded by a crash or a failed record. First
            # copy wins: that file stays, and the row (ours, if none is there yet) describes its bytes.
            try:
                kept = path.read_bytes()
                kept_meta = replace(meta, transfer_syntax_uid=str(read_file_meta_info(path).TransferSyntaxUID)[:64])
            except Exception as exc:
                log.exception("C-STORE %s (series %s): the copy already spooled cannot be read",
                              meta.sop_instance_uid, meta.series_uid)
                return self._quarantine(data, request, calling_ae, f"spooled copy unreadable: {exc!r}",
                                        StoreStatus.PROCESSING_FAILURE, ds_uids=uids)

        try:
            created = self._record(kept_meta, rel_path, kept, calling_ae)
        except InvalidDataset as exc:  # consistent alone, not with what is recorded (ingest.SeriesInOtherStudy)
            self._remove_unrecorded(path, meta, existed_before=not published)
            return self._quarantine(data, request, calling_ae, exc.reason, exc.status, ds_uids=uids)
        except Exception as exc:
            log.exception("C-STORE %s (series %s): database record failed", meta.sop_instance_uid, meta.series_uid)
            self._remove_unrecorded(path, meta, existed_before=not published)
            # the database's disk full (SQLITE_FULL is an OperationalError, not an OSError) is out of
            # resources, which a PACS retries later, not a processing failure
            status = (StoreStatus.OUT_OF_RESOURCES if isinstance(exc, OSError) or out_of_room(exc)
                      else StoreStatus.PROCESSING_FAILURE)
            return self._quarantine(data, request, calling_ae, f"database record failed: {exc!r}", status, ds_uids=uids)

        log.info("stored %s (series %s, study %s, %s, %d bytes) from %s%s%s", meta.sop_instance_uid, meta.series_uid,
                 meta.study_uid, kept_meta.transfer_syntax_uid, len(kept), calling_ae, "" if created else " (resend)",
                 "" if published else "; another copy reached the spool first and was kept")
        if created and self.on_stored is not None:
            try:
                self.on_stored(meta.series_uid)
            except Exception:
                log.exception("on_stored callback failed for series %s", meta.series_uid)
        return StoreStatus.SUCCESS

    def _describe_restored(self, meta: InstanceMeta, data: bytes) -> None:
        """The file of a recorded instance is back from a resend: it counts for assembly again (no purged
        mark), and the row describes the bytes now on disk (a PACS may resend in another transfer syntax)."""
        try:
            with self.session_factory() as session:
                session.execute(update(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid)
                                .values(purged_at=None, size_bytes=len(data),
                                        sha256=hashlib.sha256(data).hexdigest(),
                                        transfer_syntax_uid=meta.transfer_syntax_uid)
                                .execution_options(synchronize_session=False))
                session.commit()
        except Exception:
            log.exception("C-STORE %s: file restored but its row could not be updated", meta.sop_instance_uid)

    def _kept_aside_already(self, sop_instance_uid: str, data: bytes) -> bool:
        """Whether these very bytes are kept in quarantine already as another copy of a stored instance
        (answered Success): a PACS re-sending the same study added a row for each time. Never raises."""
        try:
            with self.session_factory() as session:
                kept = session.scalars(select(QuarantineItem.path).where(
                    QuarantineItem.sop_instance_uid == sop_instance_uid[:64],
                    QuarantineItem.status_code == int(StoreStatus.SUCCESS),
                    QuarantineItem.purged_at.is_(None))).all()
            return any(_same_bytes(self.quarantine_dir / rel, data) for rel in kept)
        except Exception as exc:  # noqa: BLE001 - then it is kept once more, which loses nothing
            log.warning("quarantine lookup for %s failed: %s", sop_instance_uid, error_line(exc))
            return False

    def _stored_path(self, meta: InstanceMeta) -> str | None:
        """The spool path of this SOP Instance UID if it is already recorded."""
        with self.session_factory() as session:
            existing = find_instance(session, meta.sop_instance_uid)
            return None if existing is None else existing.path

    def _record(self, meta: InstanceMeta, rel_path: str, data: bytes, calling_ae: str) -> bool:
        digest = hashlib.sha256(data).hexdigest()
        last: Exception | None = None
        for attempt in range(1, _DB_ATTEMPTS + 1):
            with self.session_factory() as session:
                try:
                    result = record_instance(session, meta, rel_path, size_bytes=len(data), sha256=digest,
                                             calling_ae=calling_ae)
                    session.commit()
                    if result.reopened:
                        log.info("late instance %s: series %s back to receiving", meta.sop_instance_uid, meta.series_uid)
                    return result.created
                except (IntegrityError, OperationalError) as exc:
                    # a concurrent association inserted the same patient/study/series first, or the
                    # embedded database was busy: roll back and try again
                    session.rollback()
                    last = exc
                    log.info("C-STORE %s: database attempt %d/%d failed (%s), retrying",
                             meta.sop_instance_uid, attempt, _DB_ATTEMPTS, type(exc).__name__)
        assert last is not None
        raise last

    def _remove_unrecorded(self, path: Path, meta: InstanceMeta, existed_before: bool) -> None:
        """After a failed record, remove the spooled copy unless some row points to it."""
        try:
            with self.session_factory() as session:
                if find_instance(session, meta.sop_instance_uid) is not None:
                    return
        except Exception:
            log.warning("cannot check whether %s is recorded; leaving %s", meta.sop_instance_uid, path)
            return
        if not existed_before:
            path.unlink(missing_ok=True)

    def _quarantine(
        self,
        data: bytes,
        request: RequestIds,
        calling_ae: str,
        reason: str,
        status: StoreStatus,
        ds_uids: dict[str, str] | None = None,
    ) -> int:
        info = QuarantineReason(
            reason=reason,
            status_code=int(status),
            status_text=describe(status),
            calling_ae=calling_ae,
            sop_class_uid=request.sop_class_uid[:64],
            sop_instance_uid=request.sop_instance_uid[:64],
            transfer_syntax_uid=request.transfer_syntax_uid,
            **(ds_uids or {}),
        )
        try:
            rel = write_quarantine(self.quarantine_dir, data, info)
        except OSError as exc:
            log.error("C-STORE %s from %s refused (%s) and could not be quarantined either: %s",
                      request.sop_instance_uid, calling_ae, reason, exc)
            return StoreStatus.OUT_OF_RESOURCES if status == StoreStatus.SUCCESS else status
        log.warning("C-STORE %s (class %s) from %s %s: %s; quarantined as %s", request.sop_instance_uid,
                    request.sop_class_uid, calling_ae,
                    "answered Success" if status == StoreStatus.SUCCESS else f"refused with {describe(status)}",
                    reason, rel)
        try:
            with self.session_factory() as session:
                session.add(QuarantineItem(
                    path=rel, reason=reason[:2000], sop_instance_uid=request.sop_instance_uid[:64],
                    sop_class_uid=request.sop_class_uid[:64], calling_ae=calling_ae[:16], status_code=int(status),
                ))
                session.commit()
        except OperationalError as exc:  # the database away: one line; the row is written once it answers
            with self._unrecorded_lock:
                self._unrecorded_quarantine.add(rel)
            log.error("quarantine of %s kept in %s but not yet in the database (%s); recorded once it answers",
                      request.sop_instance_uid, rel, error_line(exc))
        except Exception:
            with self._unrecorded_lock:
                self._unrecorded_quarantine.add(rel)
            log.exception("quarantine of %s recorded in %s.reason.json but not in the database",
                          request.sop_instance_uid, rel)
        return status

    def record_unrecorded_quarantine(self, *, scan: bool = False) -> list[str]:
        """Write the rows of the files quarantined while the database did not answer (with ``scan``, of every
        file kept in the quarantine without one, as after a restart); return their paths. Database errors
        propagate and the files stay due."""
        from pacs_listener.quarantine import record_unrecorded

        with self._unrecorded_lock:
            due = sorted(self._unrecorded_quarantine)
        if not due and not scan:
            return []
        added = record_unrecorded(self.quarantine_dir, self.session_factory, None if scan else due)
        with self._unrecorded_lock:
            self._unrecorded_quarantine.difference_update(due)
        return added

    def run_quarantine_recorder(self, stop_event: threading.Event, interval_s: float = 10.0) -> None:
        """The service's thread: at start every kept file without a row, then every ``interval_s`` those the
        listener could not record."""
        passes = PassLog(log, "writing quarantine rows")  # an outage: one line, a reminder a minute, its end
        scan = True
        while not stop_event.is_set():
            try:
                self.record_unrecorded_quarantine(scan=scan)
                scan = False
                passes.succeeded()
            except Exception as exc:  # noqa: BLE001 - logged; the files stay and the next pass tries again
                passes.failed(exc, interval_s)
            stop_event.wait(interval_s)
