"""Durable files: the spool of received instances and the quarantine of refused ones.

Every write is atomic and durable: the bytes go to a temporary file in the destination folder, are
flushed and fsync'ed, the file is renamed (or, where an existing file must never be replaced, hard-linked)
onto its final name, and the folder is fsync'ed so that the rename itself survives a crash. A reader never sees a partial file; a crash leaves at most a
``.tmp-*`` file, which :func:`clean_temp_files` removes.

Layout::

    spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    quarantine/<YYYY-MM-DD>/<uuid>.dcm
    quarantine/<YYYY-MM-DD>/<uuid>.reason.json
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pacs_listener.validate import is_valid_uid

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
#: what link(2) answers on a file system without hard links (FAT, some network shares)
NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK})
_NO_LINKS_SEEN: list[Path] = []
#: how many times a write makes its folders again when they vanish before its temporary file is created
FOLDER_ATTEMPTS = 5


class UnsafeUID(ValueError):
    """A UID that cannot be used as a file name."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(folder: Path) -> None:
    """Create ``folder`` and its missing parents, fsync'ing each parent so the new entries persist."""
    missing: list[Path] = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            pass
        _fsync_dir(path.parent)


def _create_temp(folder: Path) -> tuple[int, Path]:
    """A new temporary file in ``folder``, which is created durably with its missing parents first.

    Retention removes the spool folders it empties (storage.retention). When it removes ours between their
    creation and the temporary file's (the file's ``FileNotFoundError``), the folders are made again, up to
    :data:`FOLDER_ATTEMPTS` times; once the temporary file is in the folder, retention leaves the folder be.
    """
    attempt = 1
    while True:
        try:
            _makedirs_durable(folder)
            fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=folder)
            return fd, Path(tmp_name)
        except FileNotFoundError:
            if attempt >= FOLDER_ATTEMPTS:
                raise
            attempt += 1


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a flushed and fsync'ed temporary file beside ``path`` (its folder created durably)."""
    fd, tmp = _create_temp(path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (replaces an existing file atomically)."""
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_new(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically and durably unless ``path`` exists: then write nothing and
    return False. The temporary file is hard-linked to its final name (a rename would replace a file
    published meanwhile), so of two concurrent writers exactly one publishes its bytes."""
    tmp = _write_temp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
        # no hard links here: publish by rename unless the name is taken. Two writers of one instance at
        # the same instant could both pass the check on such a file system; the rename is still atomic.
        if not _NO_LINKS_SEEN:  # once per process, not once per instance
            _NO_LINKS_SEEN.append(path.parent)
            log.warning("spool: the file system of %s has no hard links (%s); new files are published by "
                        "rename", path.parent, os.strerror(exc.errno))
        if path.exists():
            return False
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def clean_temp_files(root: Path) -> int:
    """Remove temporary files left by a crash under ``root``; returns how many were removed."""
    removed = 0
    if not root.exists():
        return 0
    for tmp in root.rglob(f"{TEMP_PREFIX}*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def check_uid(uid: str, what: str = "UID") -> str:
    """``uid`` if it is a valid DICOM UID (digits and dots only: safe as a file name), else raise."""
    if not is_valid_uid(uid) or uid in (".", ".."):
        raise UnsafeUID(f"{what} {str(uid)[:80]!r} is not a valid UID; refusing to use it as a path")
    return uid


def spool_relpath(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
    """Path of an instance relative to the spool folder (POSIX separators, as stored in the DB)."""
    return "/".join(
        (
            check_uid(study_uid, "StudyInstanceUID"),
            check_uid(series_uid, "SeriesInstanceUID"),
            check_uid(sop_instance_uid, "SOPInstanceUID") + ".dcm",
        )
    )


def write_spool(spool_dir: Path, rel_path: str, data: bytes) -> Path:
    """Write (or replace: the restore of a file that went missing) an instance's spool file."""
    path = spool_dir / rel_path
    write_atomic(path, data)
    return path


def write_spool_new(spool_dir: Path, rel_path: str, data: bytes) -> bool:
    """Publish a new instance's spool file; False when a file is there already (see :func:`write_new`)."""
    return write_new(spool_dir / rel_path, data)


@dataclass
class QuarantineReason:
    """The ``.reason.json`` sidecar of a quarantined file."""

    reason: str
    status_code: int
    status_text: str
    calling_ae: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    transfer_syntax_uid: str = ""
    received_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())


def write_quarantine(quarantine_dir: Path, data: bytes, reason: QuarantineReason) -> str:
    """Store refused bytes with their reason; returns the ``.dcm`` path relative to ``quarantine_dir``.

    The sidecar is written first, so a quarantined file never exists without its reason; it is removed
    again when the file cannot be written (the disk full), so that no reason is left without its file.
    """
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    name = uuid.uuid4().hex
    folder = quarantine_dir / day
    sidecar: dict[str, Any] = asdict(reason)
    sidecar["file"] = f"{name}.dcm"
    reason_path = folder / f"{name}.reason.json"
    write_atomic(reason_path, json.dumps(sidecar, indent=2, sort_keys=True).encode())
    try:
        write_atomic(folder / f"{name}.dcm", data)
    except BaseException:  # the disk full: no reason without its file (nothing would ever remove it)
        reason_path.unlink(missing_ok=True)
        raise
    return f"{day}/{name}.dcm"


def read_quarantine_reason(quarantine_dir: Path, rel_path: str) -> dict[str, Any]:
    path = quarantine_dir / rel_path
    return json.loads(path.with_name(path.name[: -len(".dcm")] + ".reason.json").read_text())
