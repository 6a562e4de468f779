"""send_files and the outbox Sender against real peers: DCMTK storescp and a pynetdicom SCP."""

from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import select

from dispatch.sender import (
    STATUS_ERROR_DATASET_MISMATCH,
    STATUS_NO_RESPONSE,
    STATUS_NOT_SENT,
    STATUS_REFUSED_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    STATUS_WARNING_COERCION,
    AssociationError,
    Sender,
    StoreOutcome,
    backoff_delay,
    is_success,
    is_transient,
    requeue_failed,
    send_files,
)
from medgru.settings import Destination
from storage.models import OutboxItem, OutboxState
from tests.dispatch.conftest import PACS_AET, enqueue_objects, free_port, write_objects

T0 = datetime(2031, 1, 1, 12, 0, tzinfo=timezone.utc)  # a logical clock, later than any row's default


def _settings(make_settings, port: int | None, **kw):
    dest = f"{PACS_AET}@127.0.0.1:{port}" if port else None
    return make_settings(destination=dest, send_retry_base_s=2.0, send_retry_max_s=30.0, **kw)


def _items(session_factory) -> list[OutboxItem]:
    with session_factory() as s:
        return list(s.scalars(select(OutboxItem).order_by(OutboxItem.id)))


def _received_uids(scp) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.received()}


# ------------------------------------------------------------------------------- pure policy
def test_backoff_is_exponential_and_capped() -> None:
    assert [backoff_delay(n, 2.0, 30.0) for n in range(0, 7)] == [0.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_delay(10_000, 2.0, 300.0) == 300.0


def test_status_classes() -> None:
    assert is_success(STATUS_SUCCESS) and is_success(STATUS_WARNING_COERCION)
    assert not is_success(STATUS_ERROR_DATASET_MISMATCH)
    assert is_transient(None) and is_transient(STATUS_REFUSED_OUT_OF_RESOURCES) and is_transient(0xA7FF)
    assert not is_transient(STATUS_ERROR_DATASET_MISMATCH) and not is_transient(0xC000)


# ------------------------------------------------------------------------------- send_files
@pytest.mark.integration
def test_send_files_to_storescp(storescp, result_objects, tmp_path: Path) -> None:
    storescp.start()
    paths = write_objects(result_objects, tmp_path / "out")
    statuses = send_files(Destination(ae_title=PACS_AET, host="127.0.0.1", port=storescp.port), paths,
                          calling_ae="MEDGRU", timeout=20)
    assert statuses == [STATUS_SUCCESS, STATUS_SUCCESS]
    assert _received_uids(storescp) == {str(ds.SOPInstanceUID) for ds in result_objects}


@pytest.mark.integration
def test_send_files_unreadable_file_is_not_sent(storescp, result_objects, tmp_path: Path) -> None:
    storescp.start()
    paths = write_objects(result_objects[:1], tmp_path / "out")
    junk = tmp_path / "out" / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    statuses = send_files(Destination(ae_title=PACS_AET, host="127.0.0.1", port=storescp.port),
                          [junk, *paths], calling_ae="MEDGRU", timeout=20)
    assert statuses == [STATUS_NOT_SENT, STATUS_SUCCESS]


@pytest.mark.integration
def test_send_files_peer_down_or_refusing(storescp, result_objects, tmp_path: Path) -> None:
    paths = write_objects(result_objects, tmp_path / "out")
    dest = Destination(ae_title=PACS_AET, host="127.0.0.1", port=storescp.port)
    # the peer down: nothing listens, the connection is refused at once, and the error says so (it said
    # "no TCP connection within 5 s", and an admin looked for a firewall that drops packets)
    with pytest.raises(AssociationError, match=r"unreachable \(Connection refused\)"):
        send_files(dest, paths, calling_ae="MEDGRU", timeout=5)
    storescp.start("--refuse")
    # storescp --refuse answers A-ASSOCIATE-RJ and closes the socket at once; depending on which of the
    # two pynetdicom reads first, the refusal surfaces as "rejected" or "aborted" (seen both in CI).
    # Either way nothing is sent and the error names the peer.
    with pytest.raises(AssociationError, match=rf"(rejected|aborted) by {PACS_AET}@127\.0\.0\.1:{storescp.port}"):
        send_files(dest, paths, calling_ae="MEDGRU", timeout=5)
    assert storescp.received() == []


def test_a_rejected_association_says_why(result_objects, tmp_path: Path) -> None:
    """A PACS whose allow-list lacks our AE title (Orthanc without us in DicomModalities) answers
    A-ASSOCIATE-RJ "calling AE title not recognised"; the outbox's error said only "association rejected by
    ...", the same as for a wrong called AE title or a busy PACS, so an admin could not tell which to fix."""
    paths = write_objects(result_objects, tmp_path / "out")
    ae = AE(ae_title=PACS_AET)
    ae.add_supported_context(SecondaryCaptureImageStorage)
    ae.add_supported_context(Comprehensive3DSRStorage)
    ae.require_calling_aet = ["SOMEONE_ELSE"]
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        with pytest.raises(AssociationError) as refused:
            send_files(Destination(ae_title=PACS_AET, host="127.0.0.1", port=port), paths, calling_ae="MEDGRU",
                       timeout=10)
    finally:
        server.shutdown()
    assert str(refused.value) == (f"association rejected by {PACS_AET}@127.0.0.1:{port}: calling AE title not "
                                  "recognised (rejected permanent) (calling AE MEDGRU)")


@pytest.mark.integration
def test_send_files_to_an_ipv6_peer(result_objects, tmp_path: Path) -> None:
    # a destination given as PACS@[::1]:port (the settings refused any IPv6 address before)
    received: list[str] = []
    ae = AE(ae_title=PACS_AET)
    ae.add_supported_context(Comprehensive3DSRStorage)
    ae.add_supported_context(SecondaryCaptureImageStorage)

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    server = ae.start_server(("::1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        dest = Destination.parse(f"{PACS_AET}@[::1]:{port}")
        paths = write_objects(result_objects, tmp_path / "out")
        assert send_files(dest, paths, calling_ae="MEDGRU", timeout=20) == [STATUS_SUCCESS, STATUS_SUCCESS]
    finally:
        server.shutdown()
    assert set(received) == {str(ds.SOPInstanceUID) for ds in result_objects}


@pytest.mark.integration
def test_send_files_failure_status(failing_scp, result_objects, tmp_path: Path) -> None:
    port, status = failing_scp
    paths = write_objects(result_objects, tmp_path / "out")
    assert send_files(Destination(ae_title=PACS_AET, host="127.0.0.1", port=port), paths, calling_ae="MEDGRU",
                      timeout=10) == [STATUS_ERROR_DATASET_MISMATCH] * 2


# ------------------------------------------------------------------------------- the outbox
@pytest.mark.integration
def test_sender_sends_due_items_in_one_association(make_settings, session_factory, storescp, result_objects
                                                   ) -> None:
    settings = _settings(make_settings, storescp.port)
    storescp.start()
    enqueue_objects(settings, session_factory, result_objects)
    sender = Sender(settings, session_factory, timeout=20)
    assert sender.run_once(now=T0) == 2
    items = _items(session_factory)
    assert [i.state for i in items] == [OutboxState.SENT] * 2
    assert all(i.sent_at == T0 and i.attempts == 1 and i.last_status == STATUS_SUCCESS for i in items)
    assert _received_uids(storescp) == {i.sop_instance_uid for i in items}
    assert storescp.log_path.read_text(errors="replace").count("Association Acknowledged") == 1  # the readiness probe only connects
    assert sender.run_once(now=T0 + timedelta(hours=1)) == 0  # nothing sent twice
    assert len(storescp.received()) == 2


@pytest.mark.integration
def test_sender_backs_off_while_peer_down_then_sends(make_settings, session_factory, storescp, result_objects
                                                     ) -> None:
    settings = _settings(make_settings, storescp.port)
    enqueue_objects(settings, session_factory, result_objects[:1])
    sender = Sender(settings, session_factory, timeout=5)

    assert sender.run_once(now=T0) == 0
    [item] = _items(session_factory)
    assert (item.state, item.attempts, item.last_status) == (OutboxState.PENDING, 1, None)
    assert "unreachable" in item.last_error and str(storescp.port) in item.last_error
    assert item.next_attempt_at == T0 + timedelta(seconds=2)

    assert sender.run_once(now=T0 + timedelta(seconds=1)) == 0  # not due yet: untouched
    assert _items(session_factory)[0].attempts == 1

    t1 = T0 + timedelta(seconds=2)
    assert sender.run_once(now=t1) == 0
    [item] = _items(session_factory)
    assert item.attempts == 2 and item.next_attempt_at == t1 + timedelta(seconds=4)

    storescp.start()
    t2 = item.next_attempt_at
    assert sender.run_once(now=t2) == 1
    [item] = _items(session_factory)
    assert (item.state, item.attempts, item.sent_at, item.last_error) == (OutboxState.SENT, 3, t2, "")
    assert _received_uids(storescp) == {item.sop_instance_uid}


@pytest.mark.integration
def test_an_association_lost_between_two_stores_leaves_the_rest_due_again(make_settings, session_factory, storescp,
                                                                          result_objects, monkeypatch) -> None:
    """The association can end (the PACS restarting aborts it, a time-out) after the loop saw it established
    and before the next C-STORE, whose send_c_store then raised RuntimeError: the pass failed with a
    traceback, nothing of the batch was recorded (not even what the PACS had stored) and every item stayed
    claimed for the batch's lease, up to 53 minutes for 100 items, although the PACS was back in seconds
    (seen live: the stand-in PACS killed during a send). Here the abort lands while the second file is read."""
    import dispatch.sender as sender_module

    settings = _settings(make_settings, storescp.port)
    storescp.start()
    enqueue_objects(settings, session_factory, result_objects)
    opened: list = []
    real_open, real_read = sender_module.open_association, pydicom.dcmread

    def open_and_keep(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    full_reads: list = []

    def read(path, *args, **kwargs):
        if not kwargs.get("stop_before_pixels"):
            full_reads.append(path)
            if len(full_reads) == 2:
                opened[0].abort()
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(sender_module, "open_association", open_and_keep)
    monkeypatch.setattr(pydicom, "dcmread", read)
    sender = Sender(settings, session_factory, timeout=20)
    assert sender.run_once(now=T0) == 1
    first, second = _items(session_factory)
    assert (first.state, first.sent_at) == (OutboxState.SENT, T0)
    assert (second.state, second.attempts, second.last_status) == (OutboxState.PENDING, 1, None)
    assert "association lost" in second.last_error
    assert second.next_attempt_at == T0 + timedelta(seconds=2)  # its back-off, not the batch's claim lease


@pytest.mark.integration
def test_transient_failures_never_give_up(make_settings, session_factory, result_objects) -> None:
    settings = _settings(make_settings, free_port())  # nobody listens there
    enqueue_objects(settings, session_factory, result_objects[:1])
    sender = Sender(settings, session_factory, max_attempts=3, timeout=5)
    now, delays = T0, []
    for _ in range(7):
        sender.run_once(now=now)
        [item] = _items(session_factory)
        delays.append((item.next_attempt_at - now).total_seconds())
        now = item.next_attempt_at
    assert item.state == OutboxState.PENDING and item.attempts == 7  # beyond max_attempts: still pending
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]  # base 2 s, doubling, capped at 30 s


@pytest.mark.integration
def test_failure_status_recorded_then_failed_then_requeued(make_settings, session_factory, failing_scp,
                                                           result_objects) -> None:
    port, status = failing_scp
    settings = _settings(make_settings, port)
    enqueue_objects(settings, session_factory, result_objects[:1])
    sender = Sender(settings, session_factory, max_attempts=2, timeout=10)

    assert sender.run_once(now=T0) == 0
    [item] = _items(session_factory)
    assert (item.state, item.attempts, item.last_status) == (OutboxState.PENDING, 1, STATUS_ERROR_DATASET_MISMATCH)
    assert "does not match SOP class" in item.last_error and item.sop_instance_uid in item.last_error

    assert sender.run_once(now=item.next_attempt_at) == 0
    [item] = _items(session_factory)
    assert (item.state, item.attempts) == (OutboxState.FAILED, 2)  # permanent refusal, kept for an admin
    assert sender.run_once(now=T0 + timedelta(days=1)) == 0  # FAILED is not retried by itself

    assert requeue_failed(session_factory, now=T0 + timedelta(days=1)) == 1
    status[0] = STATUS_SUCCESS
    assert sender.run_once(now=T0 + timedelta(days=1)) == 1
    assert _items(session_factory)[0].state == OutboxState.SENT


@pytest.mark.integration
def test_out_of_resources_stays_pending(make_settings, session_factory, failing_scp, result_objects) -> None:
    port, status = failing_scp
    status[0] = STATUS_REFUSED_OUT_OF_RESOURCES
    settings = _settings(make_settings, port)
    enqueue_objects(settings, session_factory, result_objects[:1])
    sender = Sender(settings, session_factory, max_attempts=2, timeout=10)
    now = T0
    for _ in range(4):
        sender.run_once(now=now)
        [item] = _items(session_factory)
        now = item.next_attempt_at
    assert (item.state, item.attempts, item.last_status) == (OutboxState.PENDING, 4, STATUS_REFUSED_OUT_OF_RESOURCES)


@pytest.mark.integration
def test_missing_outbox_file_fails_after_max_attempts(make_settings, session_factory, storescp,
                                                      result_objects) -> None:
    settings = _settings(make_settings, storescp.port)
    storescp.start()
    enqueue_objects(settings, session_factory, result_objects)
    (settings.outbox_dir / f"{result_objects[0].SOPInstanceUID}.dcm").unlink()
    sender = Sender(settings, session_factory, max_attempts=1, timeout=20)
    assert sender.run_once(now=T0) == 1
    first, second = _items(session_factory)
    assert first.state == OutboxState.FAILED and "missing from the outbox" in first.last_error
    assert second.state == OutboxState.SENT


@pytest.mark.integration
def test_items_without_destination_wait_for_one(make_settings, session_factory, storescp, result_objects) -> None:
    storescp.start()
    no_dest = _settings(make_settings, None)
    enqueue_objects(no_dest, session_factory, result_objects[:1], destination="")
    assert Sender(no_dest, session_factory).run_once(now=T0) == 0
    [item] = _items(session_factory)
    assert (item.state, item.attempts, item.destination) == (OutboxState.PENDING, 0, "")
    with_dest = _settings(make_settings, storescp.port)
    assert Sender(with_dest, session_factory, timeout=20).run_once(now=T0) == 1
    [item] = _items(session_factory)
    assert item.state == OutboxState.SENT and item.destination == str(with_dest.destination)


@pytest.mark.integration
def test_run_forever_sends_and_stops(make_settings, session_factory, storescp, result_objects) -> None:
    settings = _settings(make_settings, storescp.port)
    storescp.start()
    enqueue_objects(settings, session_factory, result_objects)
    stop = threading.Event()
    t = threading.Thread(target=Sender(settings, session_factory, timeout=20).run_forever, args=(stop, 0.05))
    t.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(i.state != OutboxState.SENT for i in _items(session_factory)):
            time.sleep(0.1)
    finally:
        stop.set()
        t.join(timeout=30)
    assert not t.is_alive()
    assert [i.state for i in _items(session_factory)] == [OutboxState.SENT] * 2
    assert len(storescp.received()) == 2


def test_a_database_outage_is_one_log_line_not_a_traceback_per_pass(make_settings, caplog) -> None:
    """PostgreSQL unreachable under `medgru serve`: the sender logged a 40-line traceback every second (as
    did the assembler), a flood for the whole outage. Now one line when it begins, one when it ends."""
    import socket

    from storage.db import make_engine, make_session_factory

    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{closed}/medgru")
    sender = Sender(make_settings(destination="PACS@127.0.0.1:104"), make_session_factory(engine))
    stop = threading.Event()
    passes = []
    real_run_once = sender.run_once

    def run_once():
        passes.append(1)
        if len(passes) == 5:
            stop.set()
        return real_run_once()

    sender.run_once = run_once
    with caplog.at_level(logging.ERROR, logger="dispatch.sender"):
        sender.run_forever(stop, interval_s=0.0)
    engine.dispose()
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(passes) == 5 and len(failures) == 1, [r.getMessage() for r in failures]
    assert failures[0].exc_info is None and "the database does not answer" in failures[0].getMessage()
    assert "Connection refused" in failures[0].getMessage()


@pytest.mark.integration
def test_association_socket_gets_tcp_nodelay(storescp) -> None:
    import socket

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    from dispatch.sender import _set_nodelay

    storescp.start()
    seen: list[int] = []

    def check(event) -> None:
        seen.append(event.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    ae = AE(ae_title="MEDGRU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", storescp.port, ae_title=PACS_AET,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay), (evt.EVT_ACCEPTED, check)])
    try:
        assert assoc.is_established
    finally:
        assoc.release()
    assert seen and seen[0] != 0


# ------------------------------------------------------------------------------- claiming (a fake peer)
class FakePeer:
    """A ``send`` callable for :class:`Sender`: records what it was asked to store and answers
    ``statuses`` (file name -> status; success for the others). ``during`` runs inside the send, as a
    second sender would while a slow peer stores the group."""

    def __init__(self, statuses: dict[str, int] | None = None, during=None) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.statuses = statuses or {}
        self.during = during

    def __call__(self, destination, paths, **_kw) -> list[StoreOutcome]:
        self.calls.append((str(destination), [p.name for p in paths]))
        if self.during is not None:
            self.during()
        outcomes = []
        for p in paths:
            status = self.statuses.get(p.name, STATUS_SUCCESS)
            outcomes.append(StoreOutcome(p, status, "" if is_success(status) else f"{p.name}: refused"))
        return outcomes


def _add_rows(session_factory, rows: list[tuple[str, str, datetime]]) -> None:
    """PENDING outbox rows (name, destination, due at); the files need not exist for a fake peer."""
    with session_factory() as s:
        for n, (name, destination, due) in enumerate(rows, start=1):
            s.add(OutboxItem(path=f"{name}.dcm", sop_instance_uid=f"1.2.826.0.1.3680043.10.1.{n}",
                             sop_class_uid="1.2.840.10008.5.1.4.1.1.7", destination=destination,
                             state=OutboxState.PENDING, attempts=0, next_attempt_at=due))
        s.commit()


def test_unroutable_items_do_not_starve_routed_ones(make_settings, session_factory) -> None:
    """No default destination: items of an un-routed calling AE (destination "") wait, but they must not
    fill the batch; the routed item behind them, newer and outnumbered, is sent in the first pass."""
    settings = make_settings(routes=f"CARDIO={PACS_AET}@127.0.0.1:11112")
    assert settings.destination is None
    routed = f"{PACS_AET}@127.0.0.1:11112"
    _add_rows(session_factory, [(f"unrouted{i}", "", T0 - timedelta(hours=1, seconds=-i)) for i in range(3)]
              + [("routed", routed, T0)])
    peer = FakePeer()
    assert Sender(settings, session_factory, batch=3, send=peer).run_once(now=T0) == 1
    assert peer.calls == [(routed, ["routed.dcm"])]
    by_path = {i.path: i for i in _items(session_factory)}
    assert by_path["routed.dcm"].state == OutboxState.SENT
    for i in range(3):  # untouched, still waiting for a destination
        item = by_path[f"unrouted{i}.dcm"]
        assert (item.state, item.attempts, item.destination) == (OutboxState.PENDING, 0, "")
        assert item.next_attempt_at == T0 - timedelta(hours=1, seconds=-i)


def test_claim_lease_covers_a_slow_group(make_settings, session_factory) -> None:
    """A live sender's claim lasts as long as its group may take (every C-STORE up to the time-out): a
    second sender running meanwhile must not claim and store the same items again."""
    settings = _settings(make_settings, 11112)
    names = [f"item{i}" for i in range(10)]
    _add_rows(session_factory, [(n, str(settings.destination), T0) for n in names])
    timeout = 30.0
    peer_b = FakePeer()
    b = Sender(settings, session_factory, timeout=timeout, send=peer_b)
    # a slow PACS: each of the 10 C-STOREs takes just under the time-out; B's pass comes near the end
    peer_a = FakePeer({"item0.dcm": STATUS_NO_RESPONSE},
                      during=lambda: b.run_once(now=T0 + timedelta(seconds=len(names) * timeout - 1)))
    a = Sender(settings, session_factory, timeout=timeout, send=peer_a)
    assert a.run_once(now=T0) == len(names) - 1
    assert peer_b.calls == []  # nothing stored twice
    by_path = {i.path: i for i in _items(session_factory)}
    lost = by_path.pop("item0.dcm")  # transient: pending, retried after the base delay
    assert (lost.state, lost.attempts, lost.last_status) == (OutboxState.PENDING, 1, None)
    assert lost.next_attempt_at == T0 + timedelta(seconds=2)
    assert all((i.state, i.attempts, i.sent_at) == (OutboxState.SENT, 1, T0) for i in by_path.values())


def test_late_outcome_after_the_claim_was_lost_is_dropped(make_settings, session_factory, caplog) -> None:
    """A sender whose send outlived its lease (a hung peer) must not write its outcome over the one of
    the sender that re-claimed and stored the items: a SENT row stays SENT, with its attempts and error."""
    settings = _settings(make_settings, 11112)
    names = [f"item{i}" for i in range(3)]
    _add_rows(session_factory, [(n, str(settings.destination), T0) for n in names])
    t_b = T0 + timedelta(days=1)  # long after any lease
    b = Sender(settings, session_factory, timeout=30, send=FakePeer())
    # A's late answer: item0 refused permanently, which with max_attempts=1 would make it FAILED
    peer_a = FakePeer({"item0.dcm": STATUS_ERROR_DATASET_MISMATCH}, during=lambda: b.run_once(now=t_b))
    a = Sender(settings, session_factory, max_attempts=1, timeout=30, send=peer_a)
    with caplog.at_level(logging.WARNING, logger="dispatch.sender"):
        assert a.run_once(now=T0) == 0  # nothing recorded by A
    items = _items(session_factory)
    assert [(i.state, i.attempts, i.sent_at, i.last_error, i.last_status) for i in items] == \
        [(OutboxState.SENT, 1, t_b, "", STATUS_SUCCESS)] * 3
    dropped = [r.getMessage() for r in caplog.records if "re-claimed" in r.getMessage()]
    assert len(dropped) == 3 and items[0].sop_instance_uid in "".join(dropped)


def test_a_stopping_sender_gives_back_the_items_of_the_send_in_flight(make_settings, session_factory, caplog) -> None:
    """A restart cuts a send short: the items it claimed are due again at once (not at the end of a lease
    that lasts an hour for a full batch), the next sender stores them, and the cut send's late outcome is
    dropped rather than written over that one's."""
    settings = _settings(make_settings, 11112)
    _add_rows(session_factory, [(f"item{i}", str(settings.destination), T0) for i in range(3)])
    t_stop = T0 + timedelta(seconds=5)
    a = Sender(settings, session_factory, max_attempts=1, timeout=30,
               send=FakePeer({"item0.dcm": STATUS_ERROR_DATASET_MISMATCH},
                             during=lambda: released.append(a.release_claims(now=t_stop))))
    released: list[int] = []
    with caplog.at_level(logging.WARNING, logger="dispatch.sender"):
        assert a.run_once(now=T0) == 0
    assert released == [3]
    assert [(i.state, i.attempts, i.next_attempt_at) for i in _items(session_factory)] == \
        [(OutboxState.PENDING, 0, t_stop)] * 3
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 3
    assert a.release_claims(now=t_stop) == 0  # no pass in flight: nothing to give back
    b = Sender(settings, session_factory, timeout=30, send=FakePeer())
    assert b.run_once(now=t_stop) == 3
    assert [i.state for i in _items(session_factory)] == [OutboxState.SENT] * 3


def test_an_outage_does_not_use_up_the_tries_meant_for_refusals(make_settings, session_factory) -> None:
    """Attempts while the PACS was unreachable stay PENDING for ever but used to count towards max_attempts:
    after an outage the first permanent refusal failed the item at once ("FAILED after 22 attempts", a review
    helper's case). Now only the peer's refusals count, and a resend starts them again."""
    settings = _settings(make_settings, 11112)
    _add_rows(session_factory, [("item0", str(settings.destination), T0)])
    down = [True]

    def peer(destination, paths, **_kw):
        if down[0]:
            raise AssociationError(f"{destination} unreachable")
        return [StoreOutcome(p, STATUS_ERROR_DATASET_MISMATCH, "refused") for p in paths]

    sender = Sender(settings, session_factory, max_attempts=3, timeout=5, send=peer)
    now = T0
    for _ in range(5):  # an outage: five attempts that never reach the peer
        sender.run_once(now=now)
        (item,) = _items(session_factory)
        now = item.next_attempt_at
    assert (item.state, item.attempts, item.refusals) == (OutboxState.PENDING, 5, 0)
    down[0] = False  # the PACS is back, and refuses the object
    states = []
    for _ in range(3):
        sender.run_once(now=now)
        (item,) = _items(session_factory)
        states.append((item.state, item.refusals))
        now = item.next_attempt_at or now
    assert states == [(OutboxState.PENDING, 1), (OutboxState.PENDING, 2), (OutboxState.FAILED, 3)]
    assert item.attempts == 8
    assert requeue_failed(session_factory) == 1
    (item,) = _items(session_factory)
    assert (item.state, item.attempts, item.refusals) == (OutboxState.PENDING, 0, 0)


def test_the_reason_for_an_unreachable_peer_costs_no_second_time_out(monkeypatch) -> None:
    """The probe that names why no connection was made (_connect_failure) waited a second full time-out after a
    peer that leaves connection attempts unanswered (a firewall dropping packets): 60 s for the echo check and
    the dashboard's Check the PACS at the default. It probes only within the time the first attempt left
    (found by a review: 6.1 s for a 3 s time-out)."""
    import dispatch.sender as sender_module

    probes: list[float] = []

    def create_connection(address, timeout):
        probes.append(timeout)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(sender_module.socket, "create_connection", create_connection)
    dest = Destination(ae_title="PACS", host="127.0.0.1", port=104)
    assert sender_module._connect_failure(dest, 3.0, elapsed=3.0) == "no TCP connection within 3 s"
    assert probes == []
    assert sender_module._connect_failure(dest, 3.0, elapsed=0.1) == "Connection refused"
    assert probes == [pytest.approx(2.9)]
