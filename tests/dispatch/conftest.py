"""Fixtures of the dispatch tests: a real DCMTK storescp, a real pynetdicom SCP that answers a chosen
status, result objects built from a corpus image, and a migrated database (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from reporting.sc import build_overlay_sc
from reporting.sr import build_sr
from storage.db import init_db, make_session_factory
from tests.reporting import helpers as rh
from tests.storage.dbutil import isolated_url

STORESCP = Path("/usr/bin/storescp")
PACS_AET = "PACS"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen | None = None, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"storescp exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s")


@dataclass
class StoreSCP:
    port: int
    out_dir: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> "StoreSCP":
        assert STORESCP.is_file(), f"{STORESCP} (DCMTK) is required"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TCP_NODELAY="1")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(STORESCP), "-v", "-aet", PACS_AET, "-od", str(self.out_dir), *extra, str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        wait_listening(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """A DCMTK storescp on a free port, NOT started (tests call ``start``, e.g. after a failed send)."""
    scp = StoreSCP(port=free_port(), out_dir=tmp_path / "pacs", log_path=tmp_path / "storescp.log")
    yield scp
    scp.stop()


@pytest.fixture
def failing_scp() -> Iterator[tuple[int, list[int]]]:
    """A pynetdicom storage SCP answering every C-STORE with the status in the returned list's first item."""
    status = [0xA900]
    ae = AE(ae_title=PACS_AET)
    ae.add_supported_context(Comprehensive3DSRStorage)
    ae.add_supported_context(SecondaryCaptureImageStorage)
    port = free_port()

    def on_store(event: evt.Event) -> int:
        return status[0]

    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield port, status
    finally:
        server.shutdown()


@pytest.fixture(scope="session")
def result_objects(dicom_corpus: Path, tmp_path_factory) -> list[pydicom.Dataset]:
    """An SR and an SC built from the DX corpus image (what the worker puts in the outbox)."""
    ds = pydicom.dcmread(dicom_corpus / rh.DX_FILE)
    frame = rh.windowed(ds)
    heat = rh.blob(frame.shape)
    det = rh.detection(heat[None])
    return [build_sr([ds], det, rh.card()), build_overlay_sc(ds, frame, heat, det, rh.card())]


@pytest.fixture
def session_factory(database_url: str):
    with isolated_url(database_url) as url:
        engine = init_db(url)
        try:
            yield make_session_factory(engine)
        finally:
            engine.dispose()


def write_objects(objects, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in objects:
        p = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def enqueue_objects(settings, session_factory, objects, *, destination: str | None = None) -> list[int]:
    """Write ``objects`` to the outbox folder and record a PENDING outbox item for each (to
    ``settings.destination`` unless ``destination`` is given); returns their ids."""
    from storage.models import OutboxItem

    paths = write_objects(objects, settings.outbox_dir)
    ids = []
    with session_factory() as s:
        for ds, p in zip(objects, paths):
            item = OutboxItem(path=p.name, sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                              destination=str(settings.destination) if destination is None else destination)
            s.add(item)
            s.flush()
            ids.append(item.id)
        s.commit()
    return ids
