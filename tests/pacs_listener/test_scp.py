"""The listener on 127.0.0.1 against real SCUs: pynetdicom and DCMTK (echoscu, storescu)."""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification
from sqlalchemy import select, text

from pacs_listener.spool import read_quarantine_reason
from pacs_listener.status import StoreStatus
from storage.db import init_db, make_session_factory
from storage.models import Instance, QuarantineItem, Series

from .conftest import ECHOSCU, STORESCU, STORESCU_TS_OPTION, make_mr, run_dcmtk, same_dataset, store_with

pytestmark = pytest.mark.integration

def storescu(port: int, files: list[Path], *extra: str, aet: str = "STORESCU", aec: str = "MEDGRU"):
    return run_dcmtk([STORESCU, "-v", "-nh", "-R", *extra, "-aet", aet, "-aec", aec, "127.0.0.1", str(port),
                      *map(str, files)], timeout=120)


def pynetdicom_assoc(port: int, contexts, aet: str = "PYSCU", aec: str = "MEDGRU"):
    ae = AE(ae_title=aet)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    return ae.associate("127.0.0.1", port, ae_title=aec)


def instance_row(session_factory, sop_uid: str) -> Instance | None:
    with session_factory() as s:
        return s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))


def quarantine_rows(session_factory) -> list[QuarantineItem]:
    with session_factory() as s:
        return list(s.scalars(select(QuarantineItem)).all())


def test_c_echo_pynetdicom_and_dcmtk(listener_factory):
    listener = listener_factory()
    assoc = pynetdicom_assoc(listener.port, [(Verification, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == StoreStatus.SUCCESS
    assoc.release()
    res = run_dcmtk([ECHOSCU, "-v", "-aec", "MEDGRU", "127.0.0.1", str(listener.port)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Received Echo Response (Success)" in res.stdout + res.stderr


def test_tcp_nodelay_is_set_on_accepted_sockets(listener_factory):
    listener = listener_factory()
    assoc = pynetdicom_assoc(listener.port, [(Verification, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    try:
        acceptors = [a for a in listener.active_associations if a.is_acceptor]
        assert acceptors, "no accepted association seen by the listener"
        for a in acceptors:
            sock = a.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


@pytest.mark.parametrize(
    "rel",
    [
        "dicom-test-files/WG04/J2KI/NM1_J2KI",  # JPEG 2000 (lossy)
        "dicom-test-files/WG04/J2KR/MR4_J2KR",  # JPEG 2000 lossless
        "dicom-test-files/WG04/JLSL/CT2_JLSL",  # JPEG-LS lossless
        "dicom-test-files/WG04/JLSN/NM1_JLSN",  # JPEG-LS near-lossless
        "dicom-test-files/WG04/RLE/CT1_RLE",  # RLE
        "pydicom/test_files/image_dfl.dcm",  # deflated
        "orthanc-tests/TransferSyntaxes/1.2.840.10008.1.2.2.dcm",  # explicit big endian
        "dicom-test-files/WG04/JPLL/MR3_JPLL",  # JPEG lossless SV1 (.70)
        "orthanc-tests/Encodings/Lena-ascii.dcm",  # JPEG baseline
    ],
)
def test_storescu_stores_each_transfer_syntax_unchanged(listener_factory, sqlite_session_factory, corpus_file, rel):
    stored: list[str] = []
    listener = listener_factory(on_stored=stored.append)
    src = corpus_file(rel)
    original = dcmread(src)
    ts = str(original.file_meta.TransferSyntaxUID)
    res = storescu(listener.port, [src], STORESCU_TS_OPTION[ts])
    log = res.stdout + res.stderr
    assert "Received Store Response (Success)" in log, log

    row = instance_row(sqlite_session_factory, original.SOPInstanceUID)
    assert row is not None, "answered Success but no row"
    assert row.transfer_syntax_uid == ts
    spooled = listener.spool_dir / row.path
    assert row.path == f"{original.StudyInstanceUID}/{original.SeriesInstanceUID}/{original.SOPInstanceUID}.dcm"
    data = spooled.read_bytes()
    assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.size_bytes
    copy = dcmread(spooled)
    assert str(copy.file_meta.TransferSyntaxUID) == ts
    # the data set is the one sent: every element equal, pixel data bytes identical (not decoded)
    assert copy.PixelData == original.PixelData
    assert same_dataset(copy, original) == []
    assert stored == [original.SeriesInstanceUID]


def test_pynetdicom_store_resend_and_series_callback(listener_factory, sqlite_session_factory):
    stored: list[str] = []
    listener = listener_factory(on_stored=stored.append)
    ds1 = make_mr()
    ds2 = make_mr(StudyInstanceUID=ds1.StudyInstanceUID, SeriesInstanceUID=ds1.SeriesInstanceUID, InstanceNumber=2)
    assoc = pynetdicom_assoc(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    try:
        for ds in (ds1, ds2, ds1):
            assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
    finally:
        assoc.release()
    first = instance_row(sqlite_session_factory, ds1.SOPInstanceUID)
    assert first is not None and instance_row(sqlite_session_factory, ds2.SOPInstanceUID) is not None
    with sqlite_session_factory() as s:
        series = s.scalar(select(Series).where(Series.series_uid == ds1.SeriesInstanceUID))
        assert len(series.instances) == 2
    assert stored == [ds1.SeriesInstanceUID] * 2  # the resend committed nothing new
    # patient names are in the file as received, never in the database
    from storage.models import Base

    with sqlite_session_factory() as s:
        for table in Base.metadata.sorted_tables:
            assert "Zorglub" not in repr(s.execute(table.select()).all()), table.name
    assert "Zorglub" in (listener.spool_dir / first.path).read_bytes().decode("latin-1")


def test_invalid_instance_answers_failure_and_is_quarantined(listener_factory, sqlite_session_factory):
    listener = listener_factory()
    ds = make_mr()
    ds.NumberOfFrames = 5  # pixel data holds one frame
    assoc = pynetdicom_assoc(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian])], aet="BADCT")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds).Status
    finally:
        assoc.release()
    assert status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert instance_row(sqlite_session_factory, ds.SOPInstanceUID) is None
    [item] = quarantine_rows(sqlite_session_factory)
    assert item.status_code == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert item.sop_instance_uid == ds.SOPInstanceUID and item.calling_ae == "BADCT"
    assert "PixelData has" in item.reason
    sidecar = read_quarantine_reason(listener.quarantine_dir, item.path)
    assert sidecar["reason"] == item.reason and sidecar["calling_ae"] == "BADCT"
    assert dcmread(listener.quarantine_dir / item.path).SOPInstanceUID == ds.SOPInstanceUID


def test_spool_write_failure_answers_out_of_resources_and_quarantines(listener_factory, sqlite_session_factory):
    listener = listener_factory()
    ds = make_mr()
    (listener.spool_dir / ds.StudyInstanceUID).write_bytes(b"")  # a file where the study folder must go
    assoc = pynetdicom_assoc(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian])])
    try:
        status = assoc.send_c_store(ds).Status
    finally:
        assoc.release()
    assert status == StoreStatus.OUT_OF_RESOURCES
    assert instance_row(sqlite_session_factory, ds.SOPInstanceUID) is None
    [item] = quarantine_rows(sqlite_session_factory)
    assert "spool write failed" in item.reason and item.sop_instance_uid == ds.SOPInstanceUID
    assert (listener.quarantine_dir / item.path).is_file()


def test_database_failure_answers_processing_failure_and_leaves_no_orphan(listener_factory, tmp_path):
    engine = init_db(f"sqlite:///{tmp_path / 'broken.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE instances"))
    factory = make_session_factory(engine)
    listener = listener_factory(session_factory=factory)
    ds = make_mr()
    assoc = pynetdicom_assoc(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian])])
    try:
        status = assoc.send_c_store(ds).Status
    finally:
        assoc.release()
    assert status == StoreStatus.PROCESSING_FAILURE
    assert not list(listener.spool_dir.rglob("*.dcm")), "spooled file left without a database row"
    [item] = quarantine_rows(factory)
    assert "database" in item.reason and item.status_code == StoreStatus.PROCESSING_FAILURE
    assert dcmread(listener.quarantine_dir / item.path).SOPInstanceUID == ds.SOPInstanceUID
    engine.dispose()


def test_a_full_database_answers_out_of_resources_and_leaves_no_orphan(listener_factory, sqlite_session_factory,
                                                                     monkeypatch):
    """The embedded database on a full disk: SQLite's commit fails with SQLITE_FULL ("database or disk is
    full"), which SQLAlchemy raises as an OperationalError, not an OSError, so the instance was answered 0x0110
    (processing failure) where a full spool is answered 0xA700 (out of resources), the status a PACS retries
    later (seen with MEDGRU_HOME on a full tmpfs). The driver's error is raised where the row is written."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    def database_full(*_args, **_kwargs):
        full = sqlite3.OperationalError("database or disk is full")
        full.sqlite_errorcode = sqlite3.SQLITE_FULL
        raise OperationalError("INSERT INTO instances ...", {}, full)

    monkeypatch.setattr("pacs_listener.scp.record_instance", database_full)
    listener = listener_factory()
    ds = make_mr()
    assert store_with(listener, ds) == StoreStatus.OUT_OF_RESOURCES
    assert instance_row(sqlite_session_factory, ds.SOPInstanceUID) is None
    assert not list(listener.spool_dir.rglob("*.dcm")), "spooled file left without a database row"
    [item] = quarantine_rows(sqlite_session_factory)
    assert item.status_code == StoreStatus.OUT_OF_RESOURCES and "disk is full" in item.reason


def test_out_of_room_reads_the_wrapped_error():
    import errno
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from pacs_listener.scp import out_of_room

    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    assert out_of_room(OperationalError("INSERT", {}, full))
    assert out_of_room(OSError(errno.ENOSPC, "No space left on device"))

    class PgError(Exception):
        sqlstate = "53100"  # disk_full

    assert out_of_room(OperationalError("INSERT", {}, PgError("could not extend file")))
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = sqlite3.SQLITE_BUSY
    assert not out_of_room(OperationalError("INSERT", {}, locked))
    assert not out_of_room(OSError(errno.EACCES, "Permission denied"))
    assert not out_of_room(RuntimeError("no such table: instances"))


def test_a_refusal_while_the_database_is_away_is_recorded_once_it_answers(listener_factory,
                                                                         sqlite_session_factory, caplog):
    """PostgreSQL unreachable: the instance was refused (0x0110) and its file kept with its reason, but its
    quarantine row was never written, then or later, so `medgru quarantine list`, the dashboard and the
    refused-instances metric did not show it and `medgru quarantine retry` could not reach it: the case that
    command is for. Now the row is written once the database answers, and a restarted service's first pass
    writes those of every kept file without one."""
    import logging

    from sqlalchemy.exc import OperationalError

    from pacs_listener.quarantine import record_unrecorded
    from storage.db import make_engine

    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    away = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{closed}/medgru")
    listener = listener_factory(session_factory=make_session_factory(away))
    ds = make_mr()
    with caplog.at_level(logging.ERROR, logger="pacs_listener.scp"):
        assert store_with(listener, ds) == StoreStatus.PROCESSING_FAILURE
    [kept] = listener.quarantine_dir.glob("*/*.dcm")
    assert quarantine_rows(sqlite_session_factory) == []
    [line] = [r for r in caplog.records if "not yet in the database" in r.getMessage()]
    assert line.exc_info is None  # an expected outage: one line, no traceback
    with pytest.raises(OperationalError):  # still away: the file stays due
        listener.record_unrecorded_quarantine()

    listener.session_factory = sqlite_session_factory  # the database answers again
    rel = f"{kept.parent.name}/{kept.name}"
    assert listener.record_unrecorded_quarantine() == [rel]
    [item] = quarantine_rows(sqlite_session_factory)
    assert (item.path, item.sop_instance_uid, item.status_code) == (rel, ds.SOPInstanceUID,
                                                                   StoreStatus.PROCESSING_FAILURE)
    assert item.calling_ae == "REVIEW" and "database" in item.reason and item.received_at is not None
    assert listener.record_unrecorded_quarantine() == []  # written once
    # after a restart (the in-memory list lost), the first pass scans the folder: nothing twice
    assert record_unrecorded(listener.quarantine_dir, sqlite_session_factory) == []
    with sqlite_session_factory() as s:
        s.delete(s.get(QuarantineItem, item.id))
        s.commit()
    assert record_unrecorded(listener.quarantine_dir, sqlite_session_factory) == [rel]
    away.dispose()


def test_calling_ae_allow_list_rejects_others(listener_factory):
    listener = listener_factory(allowed_calling_aes=["PACS1"])
    assoc = pynetdicom_assoc(listener.port, [(Verification, [ExplicitVRLittleEndian])], aet="INTRUDER")
    assert assoc.is_rejected and not assoc.is_established
    res = run_dcmtk([ECHOSCU, "-v", "-aet", "INTRUDER", "-aec", "MEDGRU", "127.0.0.1", str(listener.port)])
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Calling AE Title Not Recognized" in out, out
    res = run_dcmtk([ECHOSCU, "-v", "-aet", "PACS1", "-aec", "MEDGRU", "127.0.0.1", str(listener.port)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_wrong_called_ae_title_rejected(listener_factory):
    listener = listener_factory()
    res = run_dcmtk([ECHOSCU, "-v", "-aec", "SOMEONE", "127.0.0.1", str(listener.port)])
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Called AE Title Not Recognized" in out, out


def test_retired_sop_class_accepted_from_storescu(listener_factory, sqlite_session_factory, corpus_file):
    listener = listener_factory()
    retired = corpus_file("pydicom-data/color-px.dcm")  # retired Ultrasound Image Storage (.1.1.6)
    res = storescu(listener.port, [retired])
    assert "Received Store Response (Success)" in res.stdout + res.stderr, res.stdout + res.stderr
    assert instance_row(sqlite_session_factory, dcmread(retired).SOPInstanceUID) is not None


def test_private_sop_class_accepted(listener_factory, sqlite_session_factory, corpus_file):
    """storescu will not send an unknown SOP class; a PACS forwarding private objects will."""
    listener = listener_factory()
    ds = dcmread(corpus_file("orthanc-tests/UnknownSopClassUid.dcm"))
    assoc = pynetdicom_assoc(listener.port, [(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])])
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
    finally:
        assoc.release()
    row = instance_row(sqlite_session_factory, ds.SOPInstanceUID)
    assert row is not None and row.sop_class_uid == ds.SOPClassUID


def test_concurrent_associations_into_one_series(listener_factory, session_factory):
    """Three senders race to create the same patient/study/series (SQLite and PostgreSQL)."""
    listener = listener_factory(session_factory=session_factory)
    base = make_mr()
    datasets = [make_mr(StudyInstanceUID=base.StudyInstanceUID, SeriesInstanceUID=base.SeriesInstanceUID,
                        InstanceNumber=i) for i in range(12)]
    statuses: list[int] = []

    def send(chunk):
        assoc = pynetdicom_assoc(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian])])
        try:
            for ds in chunk:
                statuses.append(int(assoc.send_c_store(ds).Status))
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(datasets[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [StoreStatus.SUCCESS] * 12
    with session_factory() as s:
        series = s.scalars(select(Series).where(Series.series_uid == base.SeriesInstanceUID)).all()
        assert len(series) == 1 and len(series[0].instances) == 12


def test_start_removes_partial_files_left_by_a_crash(make_settings, sqlite_session_factory):
    from pacs_listener.scp import Listener
    from pacs_listener.spool import TEMP_PREFIX

    settings = make_settings(listen_host="127.0.0.1", listen_port=0)
    leftover = settings.spool_dir / "1.2.3" / "1.2.3.4" / f"{TEMP_PREFIX}x.part"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")
    kept = leftover.with_name("1.2.3.4.5.dcm")
    kept.write_bytes(b"complete")
    with Listener(settings, sqlite_session_factory) as listener:
        assert listener.port > 0
        assert not leftover.exists() and kept.exists()


def test_resend_restores_a_missing_file_and_keeps_the_first_row(listener_factory, sqlite_session_factory):
    """The row stays (its id and time), and describes the restored file: here the PACS resent in another
    transfer syntax, so size, SHA-256 and transfer syntax are those of the bytes now on disk."""
    import hashlib

    listener = listener_factory()
    ds = make_mr()
    assoc = pynetdicom_assoc(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian]),
                                             (MRImageStorage, [ImplicitVRLittleEndian])])
    try:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # pynetdicom sends in the data set's syntax
        assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
        row = instance_row(sqlite_session_factory, ds.SOPInstanceUID)
        assert row.transfer_syntax_uid == ExplicitVRLittleEndian
        (listener.spool_dir / row.path).unlink()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
    finally:
        assoc.release()
    again = instance_row(sqlite_session_factory, ds.SOPInstanceUID)
    assert again.id == row.id and again.received_at == row.received_at
    on_disk = (listener.spool_dir / row.path).read_bytes()
    assert dcmread(listener.spool_dir / row.path).SOPInstanceUID == ds.SOPInstanceUID
    assert again.transfer_syntax_uid == ImplicitVRLittleEndian
    assert (again.size_bytes, again.sha256) == (len(on_disk), hashlib.sha256(on_disk).hexdigest())


def test_resend_of_an_instance_removed_by_retention_restores_it(listener_factory, sqlite_session_factory):
    from datetime import timedelta

    from storage.models import SeriesState, utcnow
    from storage.retention import prune

    listener = listener_factory(retention_days=1)
    ds = make_mr()
    assoc = pynetdicom_assoc(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian])])
    try:
        assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
        with sqlite_session_factory() as s:  # the series was assembled and scored two days ago
            series = s.scalars(select(Series)).one()
            series.state, series.last_received_at = SeriesState.ASSEMBLED, utcnow() - timedelta(days=2)
            s.commit()
        assert prune(listener.settings, sqlite_session_factory).instances == 1
        row = instance_row(sqlite_session_factory, ds.SOPInstanceUID)
        assert row.purged_at is not None and not (listener.spool_dir / row.path).exists()
        assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS  # the PACS sends it again
    finally:
        assoc.release()
    again = instance_row(sqlite_session_factory, ds.SOPInstanceUID)
    assert again.id == row.id and again.purged_at is None
    assert dcmread(listener.spool_dir / row.path).SOPInstanceUID == ds.SOPInstanceUID


def test_late_instance_reopens_assembled_series_and_logs_carry_no_names(listener_factory, sqlite_session_factory,
                                                                         caplog):
    from storage.models import SeriesState

    caplog.set_level("DEBUG", logger="pacs_listener")
    stored: list[str] = []
    listener = listener_factory(on_stored=stored.append)
    first = make_mr()
    late = make_mr(StudyInstanceUID=first.StudyInstanceUID, SeriesInstanceUID=first.SeriesInstanceUID)
    bad = make_mr(NumberOfFrames=9)
    assoc = pynetdicom_assoc(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian])])
    try:
        assert assoc.send_c_store(first).Status == StoreStatus.SUCCESS
        with sqlite_session_factory() as s:
            s.scalar(select(Series).where(Series.series_uid == first.SeriesInstanceUID)).state = SeriesState.ASSEMBLED
            s.commit()
        assert assoc.send_c_store(late).Status == StoreStatus.SUCCESS
        assert assoc.send_c_store(bad).Status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    finally:
        assoc.release()
    with sqlite_session_factory() as s:
        series = s.scalar(select(Series).where(Series.series_uid == first.SeriesInstanceUID))
        assert series.state == SeriesState.RECEIVING and late.SOPInstanceUID in series.state_reason
    assert stored == [first.SeriesInstanceUID, first.SeriesInstanceUID]
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("pacs_listener")]
    assert any(late.SOPInstanceUID in m for m in ours) and any(bad.SOPInstanceUID in m for m in ours)
    assert not [m for m in ours if "Zorglub" in m or "Quetzal" in m]


def test_every_storage_class_with_every_transfer_syntax_is_accepted(listener_factory):
    """Each storage SOP class proposed with one of our syntaxes (rotating), each syntax at least 9 times."""
    from pacs_listener.scp import TRANSFER_SYNTAXES, storage_sop_classes

    listener = listener_factory()
    classes = storage_sop_classes()
    assert len(classes) >= 170
    pairs = [(uid, TRANSFER_SYNTAXES[i % len(TRANSFER_SYNTAXES)]) for i, uid in enumerate(classes)]
    for start in range(0, len(pairs), 120):
        chunk = pairs[start : start + 120]
        ae = AE(ae_title="PYSCU")
        for uid, ts in chunk:
            ae.add_requested_context(uid, [ts])
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDGRU")
        assert assoc.is_established
        try:
            accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
            assert accepted == set(chunk), set(chunk) - accepted
        finally:
            assoc.release()


def test_pydicom_warnings_name_the_instance_and_quote_no_values(listener_factory, sqlite_session_factory, caplog,
                                                                recwarn):
    caplog.set_level("WARNING", logger="pydicom")
    listener = listener_factory()
    ds = make_mr(PatientBirthDate="19xx0101", PatientAge="12 years", InstitutionName="Quetzal" + "x" * 58)
    assoc = pynetdicom_assoc(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian])])
    try:
        assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS  # odd values are kept, not refused
    finally:
        assoc.release()
    assert instance_row(sqlite_session_factory, ds.SOPInstanceUID) is not None
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("pydicom")]
    # the listener's own parse of the instance: named by its UID
    about = [m for m in ours if m.startswith(f"SOP Instance {ds.SOPInstanceUID}: ")]
    assert any("exceeds the maximum length of 64 allowed for VR LO" in m for m in about), ours
    # (making the data set above, in this process, warned about the date and the age: redacted too)
    assert any(m == "Invalid value for VR DA: '…'." for m in ours), ours
    for value in ("19xx0101", "12 years", "Quetzal"):
        assert not [m for m in ours if value in m], value
        assert not [w for w in recwarn if value in str(w.message)], value


def test_a_nearly_full_disk_refuses_with_out_of_resources_and_writes_nothing(listener_factory, sqlite_session_factory,
                                                                             tmp_path, caplog):
    import shutil

    free_mb = shutil.disk_usage(tmp_path).free / 1e6
    listener = listener_factory(min_free_disk_mb=free_mb * 10)  # more than this disk will ever have free
    ds = make_mr()
    dcm = tmp_path / "one.dcm"
    ds.save_as(dcm, enforce_file_format=True)
    res = storescu(listener.port, [dcm])
    assert "Refused: OutOfResources" in res.stderr, res.stderr  # a status the PACS retries later
    assert instance_row(sqlite_session_factory, ds.SOPInstanceUID) is None
    assert not any(listener.quarantine_dir.rglob("*.dcm")) and not any(listener.spool_dir.rglob("*.dcm"))
    assert any("below min_free_disk_mb" in r.getMessage() for r in caplog.records)
    # room again (the check off): the same instance is stored
    listener.settings = listener.settings.model_copy(update={"min_free_disk_mb": 0.0})
    assert "Received Store Response (Success)" in storescu(listener.port, [dcm]).stderr
    assert instance_row(sqlite_session_factory, ds.SOPInstanceUID) is not None


def _request(ds, transfer_syntax):
    from pacs_listener.validate import RequestIds

    return RequestIds(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(transfer_syntax))


@pytest.mark.parametrize("first_to_commit", ["first_to_publish", "second_to_publish"])
def test_concurrent_copies_of_one_instance_keep_the_row_and_the_file_alike(make_settings, session_factory,
                                                                          first_to_commit):
    """Two associations store the same SOP Instance UID at once, in two transfer syntaxes (a PACS retrying on
    a new association): both find it unrecorded, then A publishes its file before B. Whichever commits first,
    one file stays, and the row's size, SHA-256 and transfer syntax describe the bytes on disk."""
    from pydicom.uid import ImplicitVRLittleEndian

    from pacs_listener.scp import Listener
    from pacs_listener.spool import TEMP_PREFIX

    from .conftest import to_file_bytes

    listener = Listener(make_settings(), session_factory)
    ds = make_mr()
    sent = {"A": to_file_bytes(ds, ExplicitVRLittleEndian), "B": to_file_bytes(ds, ImplicitVRLittleEndian)}
    syntax = {"A": ExplicitVRLittleEndian, "B": ImplicitVRLittleEndian}
    both_looked_up = threading.Barrier(2)
    a_published, a_done, b_done = threading.Event(), threading.Event(), threading.Event()
    looked_up, recorded = Listener._stored_path, Listener._record

    def stored_path(self, meta):
        path = looked_up(self, meta)
        both_looked_up.wait()  # neither has written its file yet
        if threading.current_thread().name == "B":
            (a_done if first_to_commit == "first_to_publish" else a_published).wait()
        return path

    def record(self, *args, **kwargs):
        if threading.current_thread().name == "A":
            a_published.set()
            if first_to_commit == "second_to_publish":
                b_done.wait()
        return recorded(self, *args, **kwargs)

    statuses: dict[str, int] = {}
    errors: list[BaseException] = []

    def send(name: str) -> None:
        try:
            statuses[name] = listener.store(sent[name], _request(ds, syntax[name]), calling_ae=name)
        except BaseException as exc:  # reported below
            errors.append(exc)
            both_looked_up.abort()
        finally:
            (a_done if name == "A" else b_done).set()
            a_published.set()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Listener, "_stored_path", stored_path)
        mp.setattr(Listener, "_record", record)
        threads = [threading.Thread(target=send, args=(name,), name=name) for name in ("A", "B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and statuses == {"A": StoreStatus.SUCCESS, "B": StoreStatus.SUCCESS}
    row = instance_row(session_factory, ds.SOPInstanceUID)
    on_disk = (listener.spool_dir / row.path).read_bytes()
    assert row.sha256 == hashlib.sha256(on_disk).hexdigest() and row.size_bytes == len(on_disk)
    assert on_disk == sent["A"], "the first copy published was replaced"
    assert row.transfer_syntax_uid == ExplicitVRLittleEndian
    assert not list((listener.spool_dir / row.path).parent.glob(f"{TEMP_PREFIX}*"))
    assert quarantine_rows(session_factory) == []


def test_a_copy_left_unrecorded_in_the_spool_is_recorded_as_it_is(make_settings, session_factory):
    """A file at the instance's spool path without a row (a crash between the file and the commit): a resend
    in another transfer syntax is answered Success and the row describes the file that is there."""
    from pydicom.uid import ImplicitVRLittleEndian

    from pacs_listener.scp import Listener
    from pacs_listener.spool import spool_relpath

    from .conftest import to_file_bytes

    listener = Listener(make_settings(), session_factory)
    ds = make_mr()
    left = to_file_bytes(ds, ExplicitVRLittleEndian)
    path = listener.spool_dir / spool_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    path.parent.mkdir(parents=True)
    path.write_bytes(left)
    resend = to_file_bytes(ds, ImplicitVRLittleEndian)
    assert listener.store(resend, _request(ds, ImplicitVRLittleEndian)) == StoreStatus.SUCCESS
    row = instance_row(session_factory, ds.SOPInstanceUID)
    on_disk = path.read_bytes()
    assert row is not None and (listener.spool_dir / row.path) == path
    assert row.sha256 == hashlib.sha256(on_disk).hexdigest() and row.size_bytes == len(on_disk)
    assert row.transfer_syntax_uid == str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def test_text_values_with_an_embedded_nul_are_stored_without_it(listener_factory, session_factory):
    """Some modalities pad or separate text with NUL. PostgreSQL text cannot hold NUL (the commit failed,
    0x0110) and SQLite stored it: both store the value without it."""
    from storage.models import Patient, Study

    listener = listener_factory(session_factory=session_factory)
    ds = make_mr(SeriesDescription="T1\x00AX", PatientID="12\x0045", AccessionNumber="A1\x00B")
    assoc = pynetdicom_assoc(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
    finally:
        assoc.release()
    with session_factory() as s:
        series = s.scalar(select(Series).where(Series.series_uid == ds.SeriesInstanceUID))
        study = s.get(Study, series.study_fk)
        assert series.series_description == "T1AX"
        assert study.accession_number == "A1B" and s.get(Patient, study.patient_fk).patient_id == "1245"
    assert quarantine_rows(session_factory) == []


@pytest.mark.parametrize("calling, called, reason", [
    ("INTRUDER", "MEDGRU", "calling AE title not allowed"),
    ("PACS1", "SOMEONE", "called AE title is not ours"),
])
def test_a_rejected_association_is_logged_with_both_ae_titles_and_why(listener_factory, caplog, calling, called,
                                                                       reason):
    """A PACS configured with the wrong AE title (ours, or its own outside the allow-list) was refused and
    nothing on our side said so: pynetdicom logs the rejection at INFO, which the service leaves out. Found by
    a review helper with echoscu, as here."""
    import logging

    listener = listener_factory(allowed_calling_aes=["PACS1"])
    with caplog.at_level(logging.WARNING, logger="pacs_listener"):
        res = run_dcmtk([ECHOSCU, "-aet", calling, "-aec", called, "127.0.0.1", str(listener.port)])
        assert res.returncode != 0
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "rejected" in r.getMessage()]
    assert len(lines) == 1 and f"calling AE {calling!r}" in lines[0] and f"called AE {called!r}" in lines[0]
    assert reason in lines[0]


def test_the_quarantine_recorder_survives_a_database_error_without_text(listener_factory, monkeypatch, caplog):
    """A driver error whose text is empty made the recorder's one-line log (``str(exc.orig).splitlines()[0]``)
    raise IndexError inside its except clause, which ended the thread for good: the rows of instances
    refused while the database was away were then never written."""
    import logging

    from sqlalchemy.exc import OperationalError

    listener = listener_factory()
    stop = threading.Event()
    calls: list[bool] = []

    def record(*, scan: bool = False) -> list[str]:
        calls.append(scan)
        if len(calls) == 1:
            raise OperationalError("SELECT 1", {}, Exception(""))
        stop.set()  # the second pass: the loop went on after the error
        return []

    monkeypatch.setattr(listener, "record_unrecorded_quarantine", record)
    with caplog.at_level(logging.ERROR, logger="pacs_listener.scp"):
        listener.run_quarantine_recorder(stop, interval_s=0.01)
    assert calls == [True, True]  # the failed first pass (a scan) is tried again as a scan
    [line] = [r.getMessage() for r in caplog.records if "writing quarantine rows failed" in r.getMessage()]
    assert "the database does not answer (OperationalError)" in line


def test_the_quarantine_recorder_logs_an_outage_once_and_its_end(listener_factory, monkeypatch, caplog):
    """The recorder logged one error line every pass (10 s) for the whole of a database outage; like the
    other service loops (storage.db.PassLog) it now says when the outage begins, reminds once a minute and
    says when the database answers again."""
    import logging

    from sqlalchemy.exc import OperationalError

    listener = listener_factory()
    stop = threading.Event()
    calls: list[bool] = []

    def record(*, scan: bool = False) -> list[str]:
        calls.append(scan)
        if len(calls) <= 5:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        stop.set()
        return []

    monkeypatch.setattr(listener, "record_unrecorded_quarantine", record)
    with caplog.at_level(logging.WARNING, logger="pacs_listener.scp"):
        listener.run_quarantine_recorder(stop, interval_s=0.01)
    assert len(calls) == 6
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("writing quarantine rows failed: the database does not answer")
    assert "connection refused" in lines[0]
    assert lines[1].startswith("writing quarantine rows: the database answers again after")


def test_a_resend_with_other_content_is_kept_in_quarantine_not_dropped(make_settings, session_factory, caplog):
    """A second copy of a stored SOP Instance UID with other content (a corrected image re-sent under the
    same UID) was answered Success and dropped, with an INFO line saying only "already stored": the other
    content was lost without a word. The first copy stays in use; the other is kept in quarantine with the
    reason (answered Success, as before). An identical resend, or one in another transfer syntax, is not."""
    import logging

    from pydicom.uid import ImplicitVRLittleEndian

    from pacs_listener.scp import Listener

    from .conftest import make_mr, to_file_bytes

    listener = Listener(make_settings(), session_factory)
    first = make_mr()
    first_bytes = to_file_bytes(first)
    assert listener.store(first_bytes, _request(first, ExplicitVRLittleEndian)) == StoreStatus.SUCCESS
    same_again = listener.store(first_bytes, _request(first, ExplicitVRLittleEndian))
    other_syntax = listener.store(to_file_bytes(first, ImplicitVRLittleEndian), _request(first, ImplicitVRLittleEndian))
    import copy

    padded = copy.deepcopy(first)  # the same content, with trailing padding an encoder added
    padded.DataSetTrailingPadding = b"\x00" * 8
    padded_again = listener.store(to_file_bytes(padded), _request(padded, ExplicitVRLittleEndian))
    assert same_again == other_syntax == padded_again == StoreStatus.SUCCESS
    with session_factory() as s:
        assert s.query(QuarantineItem).count() == 0
    corrected = make_mr(SOPInstanceUID=first.SOPInstanceUID, StudyInstanceUID=first.StudyInstanceUID,
                        SeriesInstanceUID=first.SeriesInstanceUID, PatientID=first.PatientID)
    corrected.PixelData = b"\x07\x00" * (len(first.PixelData) // 2)  # other pixels, nothing else
    corrected_bytes = to_file_bytes(corrected)
    with caplog.at_level(logging.WARNING, logger="pacs_listener.scp"):
        assert listener.store(corrected_bytes, _request(corrected, ExplicitVRLittleEndian), "MOD") == StoreStatus.SUCCESS
    row = instance_row(session_factory, first.SOPInstanceUID)
    assert (listener.spool_dir / row.path).read_bytes() == first_bytes  # the first copy is the one used
    with session_factory() as s:
        [item] = s.query(QuarantineItem).all()
        assert item.status_code == StoreStatus.SUCCESS and "other content" in item.reason
        assert (listener.quarantine_dir / item.path).read_bytes() == corrected_bytes
    assert any("answered Success" in r.getMessage() and "other content" in r.getMessage() for r in caplog.records)
    # an admin's retry of it does not claim to have stored it: the first copy is still the one stored
    from pacs_listener.reingest import retry_quarantined

    [outcome] = retry_quarantined(listener.settings, session_factory, [item.id])
    assert not outcome.stored and outcome.message.startswith("not stored: a second copy")
    assert retry_quarantined(listener.settings, session_factory) == []  # --all: not one to retry
    with session_factory() as s:
        assert s.get(QuarantineItem, item.id).released_at is None
    # the PACS sends the same other copy again: it is kept once, not once per resend; a third content is kept
    assert listener.store(corrected_bytes, _request(corrected, ExplicitVRLittleEndian), "MOD") == StoreStatus.SUCCESS
    third = make_mr(SOPInstanceUID=first.SOPInstanceUID, StudyInstanceUID=first.StudyInstanceUID,
                    SeriesInstanceUID=first.SeriesInstanceUID, PatientID=first.PatientID)
    third.PixelData = b"\x09\x00" * (len(first.PixelData) // 2)
    assert listener.store(to_file_bytes(third), _request(third, ExplicitVRLittleEndian), "MOD") == StoreStatus.SUCCESS
    with session_factory() as s:
        assert s.query(QuarantineItem).count() == 2


def test_the_listener_queues_a_burst_of_connections_for_every_association_it_serves(listener_factory):
    """The kernel holds at most the listen backlog of connections not yet accepted, and drops the rest (their
    TCP handshakes are tried again after 1 s, then 3 s...). socketserver's backlog of 5 was less than the 16
    associations served at once: 15 echoscu started together lost 5 handshakes (TcpExtListenOverflows) and
    waited a second more. A listening socket's TCP_INFO names its backlog (tcpi_sacked, Linux)."""
    import struct

    listener = listener_factory()
    server = listener._server.socket
    info = server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    _queued, backlog = struct.unpack_from("=II", info, 24)  # tcpi_unacked, tcpi_sacked
    assert backlog >= listener._ae.maximum_associations, backlog


def _a_associate_rq(called: bytes = b"MEDGRU", calling: bytes = b"STALLER") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification (PS3.8 9.3.2), built by hand."""
    import struct

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    context = struct.pack(">BBBB", 1, 0, 0, 0) + item(0x30, Verification.encode()) + item(0x40, b"1.2.840.10008.1.2")
    variable = item(0x10, b"1.2.840.10008.3.1.1.1") + item(0x20, context)
    variable += item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32) + variable
    return struct.pack(">BBI", 1, 0, len(body)) + body


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the listener closes ``sock`` (its answers read and dropped); False if it stays open for the
    guard's 60 s, far beyond the network time-out the test sets."""
    sock.settimeout(60)
    try:
        while sock.recv(65536):
            pass
    except socket.timeout:
        return False
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize("associated", [False, True], ids=["inside-A-ASSOCIATE-RQ", "inside-P-DATA"])
def test_a_peer_silent_inside_a_pdu_is_disconnected_after_the_network_timeout(listener_factory, associated):
    """A peer that sends a PDU's 6-byte header (declaring 1000 bytes) and then nothing held that association's
    thread in recv() for as long as it kept the connection open: the accepted socket had no time-out, the
    network time-out fired ('Network timeout reached') but could not end the read, and 16 such connections
    from one host shut every other sender out ('Local Limit Exceeded') until it hung up (seen live). The
    connection is now closed once the peer has been silent for the network time-out, and the listener serves
    the next association."""
    import struct

    listener = listener_factory()
    listener._ae.network_timeout = 0.5  # copied by each new association; the default is 60 s
    with socket.create_connection(("127.0.0.1", listener.port)) as sock:
        if associated:
            sock.sendall(_a_associate_rq())
            sock.settimeout(60)
            assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC
            sock.sendall(struct.pack(">BBI", 4, 0, 1000))  # a P-DATA-TF header, then silence
        else:
            sock.sendall(struct.pack(">BBI", 1, 0, 1000))  # an A-ASSOCIATE-RQ header, then silence
        assert _closed_by_peer(sock), "the listener kept a silent peer's connection open"
    assoc = pynetdicom_assoc(listener.port, [(Verification, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == StoreStatus.SUCCESS
    assoc.release()


def _p_data(control: int, data: bytes, context_id: int = 1) -> bytes:
    import struct

    return struct.pack(">BBIIBB", 4, 0, len(data) + 6, len(data) + 2, context_id, control) + data


def _store_command(sop_class: str, sop_uid: str) -> bytes:
    """A C-STORE-RQ command set, implicit VR little endian, with its group length."""
    import struct

    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class
    cmd.CommandField = 0x0001
    cmd.MessageID = 1
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0001
    cmd.AffectedSOPInstanceUID = sop_uid
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, cmd)
    return struct.pack("<HHII", 0, 0, 4, len(fp.getvalue())) + fp.getvalue()


def _associate_raw(port: int, abstract_syntax: str) -> socket.socket:
    import struct

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    context = struct.pack(">BBBB", 1, 0, 0, 0) + item(0x30, abstract_syntax.encode())
    context += item(0x40, ExplicitVRLittleEndian.encode())
    variable = item(0x10, b"1.2.840.10008.3.1.1.1") + item(0x20, context)
    variable += item(0x50, item(0x51, struct.pack(">I", 0)) + item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + b"MEDGRU".ljust(16) + b"FLOODER".ljust(16) + bytes(32) + variable
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(struct.pack(">BBI", 1, 0, len(body)) + body)
    sock.settimeout(60)
    assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC
    return sock


@pytest.mark.parametrize("flood", ["fragments", "one-pdu"])
def test_a_request_larger_than_max_instance_mb_aborts_its_association(listener_factory, caplog, flood):
    """pynetdicom gathers a request in memory until its last fragment, and reads each PDU whole whatever its
    header declares: a peer sending data set fragments that never complete a C-STORE (or one huge PDU) grew
    the service's memory for as long as it sent (seen live: 300 MB sent, 300 MB more resident, kept after the
    connection closed). Past max_instance_mb the association is aborted and the listener stores the next
    instance as usual."""
    import struct

    listener = listener_factory(max_instance_mb=0.25)  # 256 KiB
    listener._ae.network_timeout = 600  # only the bound may end the flood in this test
    sop_uid = generate_uid()
    sock = _associate_raw(listener.port, MRImageStorage)
    with sock:
        chunk = bytes(64 * 1024)
        try:
            if flood == "fragments":
                sock.sendall(_p_data(0x03, _store_command(MRImageStorage, sop_uid)))
                for _ in range(64):  # 4 MiB of data set fragments, none of them the last
                    sock.sendall(_p_data(0x00, chunk))
            else:
                sock.sendall(struct.pack(">BBI", 4, 0, 64 * 2**20))  # a 64 MiB P-DATA-TF...
                for _ in range(64):
                    sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we sent
        assert _closed_by_peer(sock), "the listener kept gathering the request"
    assert "more than max_instance_mb 0.25" in caplog.text
    if flood == "fragments":
        assert f"(C-STORE {sop_uid})" in caplog.text
    ds = make_mr()
    assoc = pynetdicom_assoc(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
    assoc.release()


def test_requests_sent_without_waiting_for_their_answers_count_towards_max_instance_mb(
        listener_factory, caplog, monkeypatch):
    """The bound on one request was reset as each request completed, though the association still held the
    complete ones it had not yet taken: a peer sending C-STOREs back to back without waiting for the answers
    (beyond the one operation at a time negotiated) had them all held in memory (seen live: 100 requests of
    7 MB against medgru serve with max_instance_mb 8, RSS 160 -> 592 MB). While a request is being served,
    those queued behind it count, and past the bound the association is aborted."""
    from pacs_listener.scp import Listener

    serving, release = threading.Event(), threading.Event()
    on_store = Listener._on_store

    def held(self, event):  # the first request is served only once the flood is over
        serving.set()
        release.wait()
        return on_store(self, event)

    monkeypatch.setattr(Listener, "_on_store", held)
    listener = listener_factory(max_instance_mb=0.25)  # 256 KiB
    listener._ae.network_timeout = 600  # only the bound may end the flood in this test
    sock = _associate_raw(listener.port, MRImageStorage)
    try:
        with sock:
            chunk = bytes(32 * 1024)
            try:
                for n in range(32):  # 1 MiB of complete requests of 32 KiB each
                    sock.sendall(_p_data(0x03, _store_command(MRImageStorage, generate_uid())))
                    sock.sendall(_p_data(0x02, chunk))
                    if n == 0:
                        assert serving.wait(60)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed while we sent
            assert _closed_by_peer(sock), "the listener kept every request sent ahead of its answers"
    finally:
        release.set()
    assert "more than max_instance_mb 0.25" in caplog.text
    monkeypatch.setattr(Listener, "_on_store", on_store)
    listener = listener_factory(max_instance_mb=0.25)
    assoc = pynetdicom_assoc(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    for _ in range(3):  # 3 x 128 KiB, one request after the other, each answered: they do not add up
        assert assoc.send_c_store(make_mr(rows=256, cols=256)).Status == StoreStatus.SUCCESS
    assoc.release()


def test_a_data_set_refused_as_too_costly_to_parse_is_not_parsed_for_its_quarantine_record(
        make_settings, sqlite_session_factory, monkeypatch):
    """A data set refused because pydicom's parse would cost too much (a deflate bomb past
    MAX_INFLATED_BYTES, more than MAX_ELEMENTS) was parsed by pydicom all the same, to read its study and
    series UIDs for the quarantine record: a refused deflate bomb was inflated whole (a 1 MB file of 1 GiB of
    zeros: 1 GiB more resident, where the check holds at most 512 MiB; a 1 GB request could claim a
    terabyte), and 1 M empty items cost their 18 s of CPU after the refusal. Such a data set is quarantined
    without being parsed; a data set refused for another reason still has its UIDs read."""
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    import pacs_listener.validate as validate
    from pacs_listener.scp import Listener
    from pacs_listener.validate import RequestIds

    from .test_validate import to_file_bytes

    inflated = []
    decompress = zlib.decompress
    monkeypatch.setattr(zlib, "decompress", lambda data, *a: inflated.append(1) or decompress(data, *a))
    monkeypatch.setattr(validate, "MAX_INFLATED_BYTES", 2**20)
    listener = Listener(make_settings(min_free_disk_mb=0), sqlite_session_factory)

    def refuse(ds, ts):
        request = RequestIds(sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax_uid=ts)
        assert listener.store(to_file_bytes(ds, ts), request, "BOMBER") != StoreStatus.SUCCESS
        with sqlite_session_factory() as session:
            return session.scalars(select(QuarantineItem).where(
                QuarantineItem.sop_instance_uid == ds.SOPInstanceUID)).one()

    bomb = make_mr()
    bomb.add_new(0x00091010, "OB", bytes(8 * 2**20))  # 8 MiB of zeros: a few KiB deflated
    bomb.add_new(0x00090010, "LO", "BOMB TEST")
    row = refuse(bomb, DeflatedExplicitVRLittleEndian)
    assert "MAX_INFLATED_BYTES" in row.reason
    assert inflated == [], "pydicom inflated the refused deflate bomb"

    broken = make_mr()
    broken.BitsAllocated = 12  # refused by the pixel module's check, after the encoding check passed
    refuse(broken, DeflatedExplicitVRLittleEndian)
    assert inflated, "the UIDs of a data set refused for its pixel module were not read"
