"""Model loading (:func:`inference.api.load_model`) against the model folders shipped in ``inference/``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from inference.api import ModelCard, get_detector_class, load_model

INFERENCE = Path(__file__).resolve().parents[2] / "inference"
#: the model folders shipped with the code: the MedGRU-SVC models and the k-NN baselines
BUNDLED = sorted(p for sub in ("bundled", "models") for p in (INFERENCE / sub).iterdir() if (p / "card.json").is_file())


def test_bundled_models_list_every_file_their_detector_loads_and_load_verified():
    assert {p.name for p in BUNDLED} >= {"brain-mr", "chest-cxr", "knn-effnet-brain-mr", "knn-effnet-chest-cxr"}
    for folder in BUNDLED:
        card = ModelCard.read(folder)
        assert set(get_detector_class(card.detector).MODEL_FILES) <= set(card.files), folder.name
        assert load_model(folder, verify=True).card.name == card.name


def test_a_tampered_head_left_off_the_card_is_refused(tmp_path):
    """The reviewer's case: the chest model's threshold multiplied by 100, and ``svdd.npz`` then dropped from
    the card's list (or the list emptied) so that the checksum check no longer looked at it."""
    model_dir = tmp_path / "chest"
    shutil.copytree(next(p for p in BUNDLED if p.name == "chest-cxr"), model_dir)
    with np.load(model_dir / "svdd.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["threshold"] = arrays["threshold"] * 100
    np.savez_compressed(model_dir / "svdd.npz", **arrays)
    with pytest.raises(ValueError, match="checksum of svdd.npz"):
        load_model(model_dir, verify=True)
    card = json.loads((model_dir / "card.json").read_text())
    del card["files"]["svdd.npz"]
    (model_dir / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="svdd.npz is not listed"):
        load_model(model_dir, verify=True)
    card["files"] = {}
    (model_dir / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="lists no files"):
        load_model(model_dir, verify=True)
