"""Fixtures for the listener tests: databases (via ``storage.db.init_db``), data sets, a running Listener."""

from __future__ import annotations

import os
import socket
import subprocess
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy.orm import Session, sessionmaker

from storage.db import init_db, make_session_factory

ECHOSCU = "/usr/bin/echoscu"
STORESCU = "/usr/bin/storescu"
PATIENT_NAME = "Zorglubienne^Quetzalia"  # must never appear in logs or tables

# storescu option that makes it propose (and so send unchanged) each transfer syntax
STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2": "-xi",
}


@pytest.fixture
def session_factory(database_url: str) -> sessionmaker[Session]:
    engine = init_db(database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def sqlite_session_factory(tmp_path: Path) -> sessionmaker[Session]:
    engine = init_db(f"sqlite:///{tmp_path / 'listener.sqlite3'}")
    yield make_session_factory(engine)
    engine.dispose()


def make_mr(rows: int = 4, cols: int = 4, **attrs) -> Dataset:
    """A small valid MR instance (fresh UIDs) with native 16-bit pixel data."""
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "PID-" + generate_uid()[-8:]
    ds.Modality = "MR"
    ds.SeriesDescription = "T1 cérébral"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [0.0, 0.0, 1.5]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.AcquisitionDate = "20240102"
    ds.AcquisitionTime = "101112.5"
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(rows * cols * 2)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what pynetdicom's send_c_store encodes with
    return ds


def to_file_bytes(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """Part 10 bytes, as the listener builds them from a C-STORE request."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", MRImageStorage)
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def run_dcmtk(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    assert Path(args[0]).is_file(), f"DCMTK tool {args[0]} is missing (apt install dcmtk)"
    return subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout, env=dcmtk_env())


@pytest.fixture
def listener_factory(make_settings, sqlite_session_factory):
    """Start Listeners on 127.0.0.1 with a free port; stopped at teardown."""
    from pacs_listener.scp import Listener

    started: list = []

    def factory(session_factory=None, on_stored=None, **overrides):
        overrides.setdefault("listen_host", "127.0.0.1")
        overrides.setdefault("listen_port", 0)
        settings = make_settings(**overrides)
        listener = Listener(settings, session_factory or sqlite_session_factory, on_stored=on_stored)
        listener.start()
        started.append(listener)
        return listener

    yield factory
    for listener in started:
        listener.stop()


@pytest.fixture
def corpus_file(dicom_corpus: Path):
    def get(rel: str) -> Path:
        path = dicom_corpus / rel
        assert path.is_file(), f"corpus file {rel} missing"
        return path

    return get


def same_dataset(a: Dataset, b: Dataset) -> list[str]:
    """Differences between two data sets, ignoring group lengths and trailing padding (FFFC,FFFC),
    which a sender may drop or recompute when it re-encodes."""

    def tags(ds):
        return {e.tag for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC}

    diffs = [f"only in one: {t}" for t in tags(a) ^ tags(b)]
    diffs += [f"differs: {t}" for t in sorted(tags(a) & tags(b)) if a[t] != b[t]]
    return diffs


def store_with(listener, ds, ts=None) -> int:
    """``listener.store`` of ``ds`` as a C-STORE request from AE REVIEW would carry it."""
    from pacs_listener.validate import RequestIds

    data = to_file_bytes(ds, ts) if ts else to_file_bytes(ds)
    return listener.store(data, RequestIds(ds.SOPClassUID, ds.SOPInstanceUID, ts or ds.file_meta.TransferSyntaxUID),
                          "REVIEW")
