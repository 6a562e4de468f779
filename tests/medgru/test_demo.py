"""``medgru demo`` (the README's first command): the whole loop on the embedded default, run twice in
one home, and the rules for clearing that home."""

from __future__ import annotations

from pathlib import Path

import pytest

from medgru.demo import DEMO_MARKER, prepare_home, run_demo


def test_prepare_home_makes_a_new_folder_and_marks_it(tmp_path: Path):
    home = tmp_path / "new" / "demo"
    prepare_home(home)
    assert [p.name for p in home.iterdir()] == [DEMO_MARKER]


def test_prepare_home_clears_an_earlier_demo(tmp_path: Path):
    home = tmp_path / "demo"
    prepare_home(home)
    (home / "spool" / "x").mkdir(parents=True)
    (home / "medgru.sqlite3").write_bytes(b"old")
    prepare_home(home)
    assert [p.name for p in home.iterdir()] == [DEMO_MARKER]


def test_prepare_home_clears_an_unmarked_demo_of_an_older_version(tmp_path: Path):
    home = tmp_path / "demo"
    (home / "demo-pacs").mkdir(parents=True)
    (home / "medgru.sqlite3").write_bytes(b"old")
    prepare_home(home)
    assert [p.name for p in home.iterdir()] == [DEMO_MARKER]


def test_prepare_home_refuses_a_folder_it_did_not_make(tmp_path: Path):
    home = tmp_path / "precious"
    home.mkdir()
    (home / "study.dcm").write_bytes(b"keep me")
    with pytest.raises(SystemExit, match="not made by medgru demo"):
        prepare_home(home)
    assert (home / "study.dcm").read_bytes() == b"keep me"


def test_demo_runs_end_to_end_twice_in_the_same_home(make_settings, data_root: Path, tmp_path: Path, capsys):
    settings = make_settings()
    home = tmp_path / "demo"
    for run in (1, 2):
        rc = run_demo(settings, data_root=data_root, inputs=None, timeout=120.0, home=home)
        out = capsys.readouterr().out
        assert rc == 0, f"run {run}:\n{out}"
        assert "sent 47 instances from 3 inputs: 47 stored, 0 refused" in out, out
        assert "medgru-svc-brain-mr" in out and "medgru-svc-chest-cxr" in out, out
        assert "not_processed" in out and "no model covers modality MR, body part KNEE" in out, out
        assert "results received by the stand-in PACS (4 objects" in out, out
        assert len(list((home / "demo-pacs").rglob("*.dcm"))) == 4


def test_demo_stops_at_once_when_nothing_can_be_stored(make_settings, data_root: Path, tmp_path: Path, capsys):
    """It waited for its 600 s time-out when the listener refused every instance (a full disk, say)."""
    import shutil

    from pydicom import dcmwrite

    from tests.pacs_listener.conftest import make_mr

    free_mb = shutil.disk_usage(tmp_path).free / 1e6
    settings = make_settings(min_free_disk_mb=free_mb * 10)
    rc = run_demo(settings, data_root=data_root, inputs=None, timeout=600.0, home=tmp_path / "demo")
    out = capsys.readouterr().out
    assert rc == 1 and "error: the listener would refuse every instance" in out and "MIN_FREE_DISK_MB" in out
    assert "sent" not in out and "timed out" not in out

    broken = make_mr()
    broken.NumberOfFrames = 5  # its pixel data holds one frame: refused with 0xA900
    dcmwrite(tmp_path / "broken.dcm", broken, enforce_file_format=True)
    rc = run_demo(make_settings(), data_root=data_root, inputs=[tmp_path / "broken.dcm"], timeout=600.0,
                  home=tmp_path / "demo")
    out = capsys.readouterr().out
    assert rc == 1 and "1 stored" not in out and "0 stored, 1 refused" in out, out
    assert "error: no instance was stored" in out and "timed out" not in out


def test_send_counts_what_an_aborted_association_did_not_send(make_settings, tmp_path: Path):
    """An association that ended half-way (the listener slow past the DIMSE timeout on a loaded machine:
    pynetdicom aborted it; here the timeout is made short) made the demo's next C-STORE raise RuntimeError ("must be established"), and
    the demo failed with a traceback instead of saying what was not sent."""
    import time

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
    from pynetdicom import AE, evt

    from medgru.demo import _send

    settings = make_settings()
    files = []
    for i in range(3):
        ds = pydicom.Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        files.append(tmp_path / f"{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)

    def on_store(event):
        time.sleep(1.5)  # past the sender's DIMSE timeout: it aborts the association
        return 0x0000

    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        ok, failed = _send(files, settings, server.server_address[1], dimse_timeout=0.5)
    finally:
        server.shutdown()
    assert (ok, failed) == (0, 3)


def test_a_wrong_data_root_or_input_is_one_line_not_a_traceback(make_settings, tmp_path: Path):
    """`medgru demo --data-root ../shared/data` (the README's command) run from a folder that has no
    shared/data beside it stopped with a FileNotFoundError traceback; it now names the data root."""
    settings = make_settings()
    with pytest.raises(SystemExit, match=r"medgru demo: .* does not exist: --data-root .*nowhere is not the shared/data"):
        run_demo(settings, data_root=tmp_path / "nowhere", inputs=None, timeout=60.0, home=tmp_path / "demo")
    with pytest.raises(SystemExit, match=r"medgru demo: demo input .*missing\.dcm does not exist"):
        run_demo(settings, data_root=None, inputs=[tmp_path / "missing.dcm"], timeout=60.0, home=tmp_path / "demo")
    assert not (tmp_path / "demo").exists()  # refused before anything was made
