"""Model loading (:func:`inference.api.load_model`) against the model folders shipped in ``inference/``, and
the series threshold (:meth:`inference.api.Detector.series_threshold`) against simulated normals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from inference.api import Detector, ModelCard, conformal_exceedance_bound, get_detector_class, load_model

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


class _Calibrated(Detector):
    """Only the calibration of the base class: the series threshold is what is under test."""

    def fit(self, normals, *, validation=(), seed=0):
        raise NotImplementedError

    def score_batch(self, sequences):
        raise NotImplementedError

    def detect(self, sequence, *, explain=True):
        raise NotImplementedError

    @property
    def threshold(self):
        return self._threshold

    def save(self, model_dir):
        return []

    @classmethod
    def load(cls, model_dir, card):
        return cls()


def _series_fpr(frames: int, trials: int, same_frame: bool, rule: str) -> float:
    """The share of series of ``frames`` normal frames flagged, each trial with fresh calibration normals
    (200, standard normal scores) and a fresh series (independent frames, or one frame repeated)."""
    rng = np.random.default_rng(frames * 7 + same_frame)
    det, flagged = _Calibrated(), 0
    for _ in range(trials):
        det.calibrate(rng.standard_normal(200), 0.05)
        series = np.repeat(rng.standard_normal(1), frames) if same_frame else rng.standard_normal(frames)
        thr = det.series_threshold(frames) if rule == "series" else det.threshold
        flagged += int(series.max() > thr)
    return flagged / trials


def test_the_series_threshold_holds_the_target_rate_where_the_single_image_threshold_does_not():
    """Series of 8 normal frames, each exchangeable with the calibration normals: compared with the
    single-image threshold about 1 - 0.95**8 = 34 % are flagged; with the series threshold at most 5 %,
    whether the frames are independent or one frame repeated (then about 5 % / 8: conservative)."""
    assert _series_fpr(8, 3000, same_frame=False, rule="single") > 0.25
    independent = _series_fpr(8, 3000, same_frame=False, rule="series")
    assert 0.025 < independent < 0.06  # the union bound is nearly tight for independent frames
    assert _series_fpr(8, 3000, same_frame=True, rule="series") < 0.02
    assert _series_fpr(1, 3000, same_frame=False, rule="series") < 0.065


def test_the_series_threshold_falls_back_and_says_how_far_the_guarantee_weakens():
    det = _Calibrated()
    det.calibrate(np.arange(1.0, 41.0), 0.05)  # 40 scores
    assert det.series_threshold(1) == det.threshold == 39.0
    assert det.series_threshold(2) == 40.0  # rank ceil(41 * 0.975) = 40
    assert det.series_fpr_bound(1) == pytest.approx(2 / 41) and det.series_fpr_bound(2) == pytest.approx(2 / 41)
    assert det.series_threshold(8) == 40.0 and det.series_fpr_bound(8) == pytest.approx(8 / 41)  # too few scores
    assert conformal_exceedance_bound(40, 0.05) == pytest.approx(2 / 41)
    det.set_threshold(12.5)
    assert det.calibration_scores is None and det.series_threshold(8) == 12.5 and det.series_fpr_bound(8) is None
    with pytest.raises(ValueError):
        det.series_threshold(0)
    with pytest.raises(ValueError):
        det.calibrate([1.0, float("nan")], 0.05)


def test_a_model_folder_that_a_killed_run_left_half_written_is_never_served(tmp_path):
    """``medgru train`` and ``medgru calibrate`` write into a hidden folder beside ``--out``; a run killed after
    its card was written leaves that folder behind. Discovery (the worker's registry) must not serve it: it
    sorts before the real model and would be picked first."""
    from inference.api import discover_model_dirs, select_model
    from medgru.settings import BUNDLED_MODELS_DIR
    from training.model_folder import staged_model_folder

    models = tmp_path / "models"
    shutil.copytree(BUNDLED_MODELS_DIR / "chest-cxr", models / "chest")

    class Killed(BaseException):
        pass

    try:
        with staged_model_folder(models / "chest") as stage:
            shutil.copytree(BUNDLED_MODELS_DIR / "chest-cxr", stage, dirs_exist_ok=True)
            left = stage
            raise Killed  # stands for SIGKILL: the clean-up below would not run
    except Killed:
        pass
    shutil.copytree(BUNDLED_MODELS_DIR / "chest-cxr", left)  # what SIGKILL leaves: the staged folder, whole
    assert left.name.startswith(".chest.partial-") and (left / "card.json").is_file()
    assert discover_model_dirs([models]) == [models / "chest"]
    cards = [(d, ModelCard.read(d)) for d in discover_model_dirs([models])]
    assert select_model(cards, "CR", "CHEST")[0] == models / "chest"


def test_a_card_whose_params_differ_from_the_saved_ones_is_refused(tmp_path):
    """The card is not checksummed (it holds the checksums); MedGRU-SVC's meta.json is, and holds the
    params its weights were saved with. A card edited to CLAHE clip 0 and tile grid 2 loaded, verified,
    and moved every score."""
    model_dir = tmp_path / "chest"
    shutil.copytree(next(p for p in BUNDLED if p.name == "chest-cxr"), model_dir)
    card = json.loads((model_dir / "card.json").read_text())
    card["params"]["clip_limit"], card["params"]["tile_grid"] = 0.0, 2
    (model_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    for verify in (True, False):
        with pytest.raises(ValueError, match="params differ from meta.json's.* in clip_limit, tile_grid;"):
            load_model(model_dir, verify=verify)


def test_a_folder_from_before_a_param_existed_loads_after_medgru_calibrate(tmp_path):
    """Found by a review: a model folder written before a MedGRU-SVC param existed (cluster_max_pool, ad29424) lacks it in
    card.json and meta.json. ``medgru calibrate`` keeps the card's params and writes meta.json with the current
    ones (the new key at its default): the folder it wrote, and its own check load, were refused ("params differ
    from meta.json's ... in cluster_max_pool")."""
    import hashlib
    import shutil

    from inference.api import load_model, save_model

    src = Path(__file__).resolve().parents[2] / "inference" / "bundled" / "chest-cxr"
    old = tmp_path / "old"
    shutil.copytree(src, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["params"]["cluster_max_pool"]
    (old / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    card = json.loads((old / "card.json").read_text())
    del card["params"]["cluster_max_pool"]
    card["files"]["meta.json"] = hashlib.sha256((old / "meta.json").read_bytes()).hexdigest()
    (old / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    det = load_model(old, verify=True)
    new = tmp_path / "new"  # what medgru calibrate writes: save_model, then the old card with new checksums
    shutil.copytree(old, new)
    save_model(det, new)
    card["files"]["meta.json"] = hashlib.sha256((new / "meta.json").read_bytes()).hexdigest()
    card["files"]["svdd.npz"] = hashlib.sha256((new / "svdd.npz").read_bytes()).hexdigest()
    card["files"]["encoder.pt"] = hashlib.sha256((new / "encoder.pt").read_bytes()).hexdigest()
    (new / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    assert "cluster_max_pool" in json.loads((new / "meta.json").read_text())["params"]
    assert load_model(new, verify=True).cluster_max_pool == 1000


def test_split_calibration_normals_holds_out_a_share_or_takes_the_given_validation():
    """The held-out calibration split that knn-effnet and patch-gan share."""
    import numpy as np

    from inference.api import split_calibration_normals

    fit, cal = split_calibration_normals("d", list(range(10)), [], 0.2, np.random.default_rng(0))
    assert len(cal) == 2 and sorted(fit + cal) == list(range(10))
    assert split_calibration_normals("d", [1, 2], [9], 0.2, np.random.default_rng(0)) == ([1, 2], [9])
    assert split_calibration_normals("d", [1, 2], [], 0.9, np.random.default_rng(0))[0] != []  # one left to fit
    for normals in ([], [1]):
        with pytest.raises(ValueError):
            split_calibration_normals("d", normals, [], 0.2, np.random.default_rng(0))


def test_hidden_models_are_those_an_earlier_model_covers_wholly():
    """select_model takes the first model that covers a series, so a model whose whole scope an earlier one
    covers is never used (a site-calibrated chest-cxr-site found after chest-cxr in a folder of models)."""
    from inference.api import Scope, hidden_models

    def card(name, modalities, body_parts=()):
        return Path(name), ModelCard(name=name, version="1", detector="x",
                                     scope=Scope(modalities=tuple(modalities), body_parts=tuple(body_parts)))

    chest, chest_site = card("chest", ["CR", "DX"], ["CHEST"]), card("chest-site", ["CR", "DX"], ["chest"])
    brain, any_mr = card("brain", ["MR"], ["BRAIN"]), card("any-mr", ["MR"])
    assert hidden_models([chest, brain]) == []
    assert hidden_models([chest, chest_site, brain]) == [(Path("chest-site"), chest_site[1], [chest])]
    assert hidden_models([chest_site, chest]) == [(Path("chest"), chest[1], [chest_site])]
    # partly covered is still used: a brain model before an any-body-part MR model, a CR-only before CR+DX
    assert hidden_models([brain, any_mr]) == []
    assert hidden_models([card("cr", ["CR"], ["CHEST"]), chest]) == []
    # wholly covered by several earlier ones together, or by a model of any body part
    cr, dx = card("cr", ["CR"], ["CHEST"]), card("dx", ["DX"], ["CHEST"])
    assert hidden_models([cr, dx, chest]) == [(Path("chest"), chest[1], [cr, dx])]
    assert hidden_models([any_mr, brain]) == [(Path("brain"), brain[1], [any_mr])]
