"""training.model_folder: a model folder appears whole or not at all."""

from pathlib import Path

import pytest

from training.model_folder import staged_model_folder


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
