"""Model folders written whole: staged beside their final place and renamed into it when complete.

Used by ``medgru train`` (which may replace a model folder) and ``medgru calibrate`` (which never does).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


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
    problem = out_folder_problem(out)
    if problem:
        raise ValueError(problem)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    stage.mkdir()
    try:
        yield stage
        old = None
        if out.exists() and not replace:
            raise FileExistsError(f"{out.name} appeared while the model was being written; it is left as it is")
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:12]}"
            os.rename(out, old)
        os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
