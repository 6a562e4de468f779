"""Model folders written whole: staged beside their final place and renamed into it when complete.

Used by ``medgru train`` (which may replace a model folder) and ``medgru calibrate`` (which never does).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

#: what a staged (``partial``) or set-aside (``replaced``) folder's name carries after its kind: the host
#: and process that made it, so that a later run can tell one left by a killed run from one in use
_LEFTOVER_RE = re.compile(r"^(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{12}$")


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "_"


def _aside(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    return False


def remove_leftovers(out: Path) -> list[Path]:
    """Remove what runs writing ``out`` that were killed (SIGKILL, a power cut: no ``finally`` ran) left
    beside it, and return what was removed: their staged folders, and a model folder set aside for a
    replacement that never took its place, which is put back when ``out`` is missing (the kill fell
    between the two renames). Only folders of this host's processes that no longer exist are touched; a
    run in progress, another host's on shared storage, or a name of another form is left alone."""
    out = Path(out)
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for kind in ("replaced", "partial"):  # a set-aside model first: it may have to take out's place
        prefix = f".{out.name}.{kind}-"
        for path in sorted(out.parent.glob(f"{glob.escape(prefix)}*")):
            m = _LEFTOVER_RE.match(path.name[len(prefix):])
            if not (m and path.is_dir() and m["host"] == _host_tag() and _process_is_gone(int(m["pid"]))):
                continue
            if kind == "replaced" and not out.exists():
                os.rename(path, out)
                log.warning("%s was missing: the model set aside by a run that was killed while replacing it "
                            "was put back (%s)", out.name, path.name)
                continue
            shutil.rmtree(path)
            removed.append(path)
            log.info("removed %s, left beside %s by a run that was killed", path.name, out.name)
    return removed


def out_folder_problem(out: Path) -> str | None:
    """Why ``--out`` cannot be (re)written, or ``None``: it may be new, empty, or a model folder (it has a
    ``card.json``); anything else is refused before any work, never replaced."""
    out = Path(out)
    if not out.exists():
        return None
    if not out.is_dir():
        return f"--out {out.name} exists and is not a folder"
    if any(out.iterdir()) and not (out / "card.json").is_file():
        return f"--out {out.name} is a folder with files but no card.json (not a model folder); choose another"
    return None


@contextlib.contextmanager
def staged_model_folder(out: Path, *, replace: bool = True):
    """A fresh hidden folder beside ``out`` to write a model into; when the block ends without an error it
    takes ``out``'s place by renames (a model folder already there is replaced whole, or, with
    ``replace=False``, refused: ``FileExistsError``), and on any error (Ctrl-C included) it is removed and
    ``out`` is left as it was. A worker reading ``out`` meanwhile sees the old model or the new one, never
    a mixture with stale checksums."""
    out = Path(out)
    remove_leftovers(out)
    problem = out_folder_problem(out)
    if problem:
        raise ValueError(problem)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = _aside(out, "partial")
    stage.mkdir()
    try:
        yield stage
        old = None
        if out.exists() and not replace:
            raise FileExistsError(f"{out.name} appeared while the model was being written; it is left as it is")
        if out.exists():
            old = _aside(out, "replaced")
            os.rename(out, old)
        os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
