import json
import os
import threading

import pytest

from pacs_listener.spool import (
    TEMP_PREFIX,
    QuarantineReason,
    UnsafeUID,
    check_uid,
    clean_temp_files,
    read_quarantine_reason,
    spool_relpath,
    write_atomic,
    write_new,
    write_quarantine,
)


def test_write_atomic_creates_folders_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "x.dcm"
    write_atomic(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]


def test_replacement_is_atomic_for_a_concurrent_reader(tmp_path):
    """A reader polling the final path sees either nothing or one complete version, never a mix."""
    target = tmp_path / "s" / "x.dcm"
    versions = [bytes([i]) * (1 << 20) for i in range(1, 9)]  # 1 MiB each, distinct content
    seen: list[bytes] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append(target.read_bytes())
            except FileNotFoundError:
                seen.append(b"")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for data in versions:
            write_atomic(target, data)
    finally:
        stop.set()
        t.join()
    assert seen, "the reader never ran"
    for data in seen:
        assert data == b"" or data in versions
    assert target.read_bytes() == versions[-1]
    assert not list(target.parent.glob(f"{TEMP_PREFIX}*"))


def test_failed_write_leaves_neither_partial_file_nor_temp(tmp_path):
    target = tmp_path / "s" / "x.dcm"
    target.mkdir(parents=True)  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        write_atomic(target, b"data")
    assert target.is_dir() and not any(target.iterdir())
    assert not list(target.parent.glob(f"{TEMP_PREFIX}*"))


def test_write_new_never_replaces_an_existing_file(tmp_path):
    target = tmp_path / "s" / "x.dcm"
    assert write_new(target, b"first")
    assert not write_new(target, b"second")
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]


def test_write_new_on_a_file_system_without_hard_links(tmp_path, monkeypatch):
    """FAT or a network share answers link(2) with EPERM / EOPNOTSUPP: the file is published by rename
    (else every new instance would be refused), and an existing file is still never replaced."""
    import errno

    import pacs_listener.spool as spool

    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(spool.os, "link", no_link)
    target = tmp_path / "s" / "x.dcm"
    assert write_new(target, b"first")
    assert not write_new(target, b"second")
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]

    def broken_link(src, dst):  # any other failure is not hidden
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool.os, "link", broken_link)
    with pytest.raises(OSError, match="Input/output"):
        write_new(tmp_path / "s" / "y.dcm", b"third")
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]


@pytest.mark.parametrize("write", [write_atomic, write_new], ids=["write_atomic", "write_new"])
def test_a_write_survives_retention_removing_its_emptied_folders_meanwhile(tmp_path, monkeypatch, write):
    """Retention removes the folders it emptied (series, then study) while the listener is about to create
    its temporary file in the series folder it just found: the write makes the folders again."""
    import pacs_listener.spool as spool

    target = tmp_path / "spool" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    target.parent.mkdir(parents=True)
    makedirs = spool._makedirs_durable
    removed: list[str] = []

    def makedirs_then_retention(folder):
        makedirs(folder)
        if not removed:  # retention's pass: rmdir of each emptied folder up to the spool root
            for empty in (folder, folder.parent):
                empty.rmdir()
                removed.append(empty.name)

    monkeypatch.setattr(spool, "_makedirs_durable", makedirs_then_retention)
    write(target, b"late instance")
    assert removed == ["1.2.3", "1.2"]
    assert target.read_bytes() == b"late instance"
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_clean_temp_files_removes_leftovers_only(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / f"{TEMP_PREFIX}abc.part").write_bytes(b"partial")
    (tmp_path / "a" / "keep.dcm").write_bytes(b"full")
    assert clean_temp_files(tmp_path) == 1
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["keep.dcm"]
    assert clean_temp_files(tmp_path / "missing") == 0


def test_spool_layout_and_uid_safety():
    assert spool_relpath("1.2.3", "1.2.3.4", "1.2.3.4.5") == "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    for bad in ("", "..", "../1.2", "1.2/3", "1.2\\3", "1.2.3 ", "1." + "9" * 70, "1.02"):
        with pytest.raises(UnsafeUID):
            check_uid(bad)
        with pytest.raises(UnsafeUID):
            spool_relpath("1.2", bad, "1.3")


def test_quarantine_writes_file_and_reason_sidecar(tmp_path):
    reason = QuarantineReason(
        reason="PixelData too short", status_code=0xA900, status_text="Failure", calling_ae="CT1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4", sop_instance_uid="1.2.3",
    )
    rel = write_quarantine(tmp_path, b"bytes", reason)
    day, name = rel.split("/")
    assert len(day) == 10 and name.endswith(".dcm")
    assert (tmp_path / rel).read_bytes() == b"bytes"
    sidecar = read_quarantine_reason(tmp_path, rel)
    assert sidecar["reason"] == "PixelData too short" and sidecar["calling_ae"] == "CT1"
    assert sidecar["status_code"] == 0xA900 and sidecar["sop_instance_uid"] == "1.2.3"
    assert sidecar["file"] == name
    on_disk = json.loads((tmp_path / day / name.replace(".dcm", ".reason.json")).read_text())
    assert on_disk == sidecar
    assert not [p for p in os.listdir(tmp_path / day) if p.startswith(TEMP_PREFIX)]


def test_a_quarantine_whose_file_cannot_be_written_leaves_no_reason_behind(tmp_path, monkeypatch):
    """The disk full: the small reason sidecar fitted, the instance's bytes did not, and the sidecar stayed
    behind without its file, one per refused instance (seen on a full tmpfs under a live listener), where
    nothing lists, records or removes it (the quarantine recorder and retention go by the .dcm files)."""
    import errno

    from pacs_listener import spool

    real = spool.write_atomic

    def no_room_for_the_file(path, data):
        if path.suffix == ".dcm":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(spool, "write_atomic", no_room_for_the_file)
    reason = QuarantineReason(reason="spool write failed", status_code=0xA700, status_text="Failure")
    with pytest.raises(OSError):
        write_quarantine(tmp_path, b"bytes", reason)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
