"""training.model_folder: a model folder appears whole or not at all."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from training.model_folder import remove_leftovers, staged_model_folder


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_folder_that_appears_meanwhile_is_not_replaced_when_replacing_is_off(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(FileExistsError):
        with staged_model_folder(out, replace=False) as stage:
            (stage / "card.json").write_text("new")
            out.mkdir()
            (out / "card.json").write_text("someone else's")
    assert (out / "card.json").read_text() == "someone else's"
    assert _names(tmp_path) == ["model"]  # the staged folder is gone


def test_a_model_folder_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "card.json").write_text("old")
    (out / "stale.npz").write_bytes(b"old")
    with staged_model_folder(out) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".model.partial-")
        (stage / "card.json").write_text("new")
    assert _names(out) == ["card.json"] and (out / "card.json").read_text() == "new"
    assert _names(tmp_path) == ["model"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_folders_left_by_killed_runs_are_removed_by_the_next_run(tmp_path):
    # a run killed with SIGKILL (no finally) left its staged folder beside the model for ever
    out = tmp_path / "model"
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())
    dead, alive = _dead_pid(), os.getppid()
    leftovers = {
        "killed": tmp_path / f".model.partial-{host}-{dead}-{'a' * 12}",
        "killed_aside": tmp_path / f".model.replaced-{host}-{dead}-{'b' * 12}",
        "running": tmp_path / f".model.partial-{host}-{alive}-{'c' * 12}",
        "other_host": tmp_path / f".model.partial-otherhost-{dead}-{'d' * 12}",
        "other_model": tmp_path / f".model2.partial-{host}-{dead}-{'e' * 12}",
        "older_form": tmp_path / f".model.partial-{'f' * 12}",
    }
    for path in leftovers.values():
        path.mkdir()
        (path / "card.json").write_text(path.name)
    out.mkdir()
    (out / "card.json").write_text("old")
    with staged_model_folder(out) as stage:
        assert stage.name.startswith(f".model.partial-{host}-{os.getpid()}-")
        (stage / "card.json").write_text("new")
    assert (out / "card.json").read_text() == "new"
    assert not leftovers["killed"].exists() and not leftovers["killed_aside"].exists()
    for kept in ("running", "other_host", "other_model", "older_form"):
        assert leftovers[kept].is_dir(), kept


def test_a_model_set_aside_by_a_run_killed_between_its_renames_is_put_back(tmp_path):
    out = tmp_path / "model"
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())
    aside = tmp_path / f".model.replaced-{host}-{_dead_pid()}-{'a' * 12}"
    aside.mkdir()
    (aside / "card.json").write_text("the model that was served")
    assert remove_leftovers(out) == []
    assert (out / "card.json").read_text() == "the model that was served" and not aside.exists()
