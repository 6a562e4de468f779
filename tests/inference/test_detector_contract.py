"""The contract every registered detector keeps, checked on tiny synthetic data.

Parametrised over :func:`inference.api.registered_detectors`, so a detector added later is covered the
moment its module lands in ``inference/detectors/``. Each detector is built with its ``SMALL_PARAMS``,
fitted once per module on smooth synthetic textures (normals), and then checked for: finite scores that
rank a planted bright blob above held-out normals, valid detections with frame-shaped heat maps for
T = 1 and T = 3, a save -> card -> ``load_model`` round trip with the same scores, the checksum check,
``set_threshold`` surviving save and load (what ``medgru calibrate`` relies on), ``get_params``
rebuilding an untrained twin, and the series rule: a series of T frames is judged by its highest frame
scored alone against the calibration scores' quantile at target FPR / T, prior-study context frames left
out, with the calibration scores saved and verified beside the model.
"""

from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest

from inference.api import (
    Detection,
    ModelCard,
    Scope,
    conformal_min_normals,
    conformal_threshold,
    FrameSequence,
    load_model,
    registered_detectors,
    save_model,
    sha256_file,
)

SIZE = 64
DETECTORS = sorted(registered_detectors())


def texture(seed: int, t: int = 1, size: int = SIZE) -> np.ndarray:
    """Smooth random texture frames ``(t, size, size)`` in [0.2, 0.7]: our synthetic 'normal anatomy'."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(t):
        n = cv2.GaussianBlur(rng.normal(size=(size, size)).astype(np.float32), (0, 0), 3.0)
        n = (n - n.min()) / (n.max() - n.min() + 1e-6)
        frames.append(0.2 + 0.5 * n)
    return np.stack(frames).astype(np.float32)


def with_blob(frames: np.ndarray, seed: int) -> np.ndarray:
    """Plant a bright disc (the 'lesion') in every frame."""
    rng = np.random.default_rng(seed)
    out = frames.copy()
    _, h, w = out.shape
    cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
    yy, xx = np.mgrid[:h, :w]
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2) <= (h // 5) ** 2
    out[:, disc] = 1.0
    return out


def seq(frames: np.ndarray):
    from inference.api import FrameSequence

    return FrameSequence(frames=frames, modality="CR", body_part="CHEST", bits_stored=8)


def test_registry_is_not_empty():
    assert "knn-effnet" in DETECTORS


@pytest.fixture(scope="module", params=DETECTORS)
def trained(request):
    """(class, fitted detector) for one registered detector, fitted once per module."""
    cls = registered_detectors()[request.param]
    det = cls(**cls.SMALL_PARAMS)
    normals = [seq(texture(i)) for i in range(16)]
    validation = [seq(texture(100 + i)) for i in range(8)]
    det.fit(normals, validation=validation, seed=0)
    return cls, det


def test_scores_finite_and_planted_anomaly_scores_higher(trained):
    _, det = trained
    held_out = [seq(texture(1000 + i)) for i in range(8)]
    anomalies = [seq(with_blob(texture(2000 + i), seed=i)) for i in range(8)]
    s_norm = det.score_batch(held_out)
    s_anom = det.score_batch(anomalies)
    assert s_norm.shape == (8,) and s_anom.shape == (8,)
    assert np.isfinite(s_norm).all() and np.isfinite(s_anom).all()
    assert s_anom.mean() > s_norm.mean(), (s_anom, s_norm)
    assert np.isfinite(det.threshold)


@pytest.mark.parametrize("t", [1, 3])
def test_detect_returns_valid_detection(trained, t):
    _, det = trained
    frames = with_blob(texture(3000 + t, t=t), seed=t)
    d = det.detect(seq(frames), explain=True)
    assert isinstance(d, Detection)
    assert d.heatmaps.shape == frames.shape
    assert d.heatmaps.dtype == np.float32
    assert 0.0 <= d.heatmaps.min() and d.heatmaps.max() <= 1.0
    assert d.threshold == pytest.approx(det.series_threshold(t))
    assert d.is_anomaly == (d.score > d.threshold)
    assert d.frame_scores == () or len(d.frame_scores) == t
    # detect and score_batch agree on the score
    assert d.score == pytest.approx(float(det.score_batch([seq(frames)])[0]), rel=1e-5, abs=1e-6)
    quiet = det.detect(seq(frames), explain=False)
    assert quiet.heatmaps.shape == frames.shape
    assert quiet.score == pytest.approx(d.score, rel=1e-5, abs=1e-6)


def _save_with_card(cls, det, model_dir):
    files = save_model(det, model_dir)
    assert files, "save must return the names of the files it wrote"
    card = ModelCard(
        name=f"contract-{cls.registry_name}", version="0.0.1", detector=cls.registry_name,
        scope=Scope(modalities=("CR",), body_parts=("CHEST",)),
        files={name: sha256_file(model_dir / name) for name in files},
        params=det.get_params(),
    )
    card.write(model_dir)
    return files


def test_save_load_round_trip_and_checksum(trained, tmp_path):
    cls, det = trained
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    files = _save_with_card(cls, det, model_dir)
    probe = [seq(texture(4000 + i)) for i in range(3)] + [seq(with_blob(texture(4100), seed=7))]
    loaded = load_model(model_dir)
    assert type(loaded) is cls
    np.testing.assert_allclose(loaded.score_batch(probe), det.score_batch(probe), rtol=1e-6, atol=1e-9)
    assert loaded.threshold == pytest.approx(det.threshold, rel=1e-9)
    d0 = det.detect(probe[-1])
    d1 = loaded.detect(probe[-1])
    np.testing.assert_allclose(d1.heatmaps, d0.heatmaps, atol=1e-5)
    assert d1.model_name == f"contract-{cls.registry_name}"

    # one changed byte in any model file must be caught
    victim = model_dir / files[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_model(model_dir)


def test_verification_refuses_a_card_that_leaves_a_model_file_unchecked(trained, tmp_path):
    """Only files the card lists were checked: a card without one of the detector's files, or with none,
    loaded with ``verify=True`` whatever that file held. ``MODEL_FILES`` declares what ``load`` reads."""
    cls, det = trained
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    files = _save_with_card(cls, det, model_dir)
    card = json.loads((model_dir / "card.json").read_text())
    (model_dir / "training.json").write_text("{}\n")  # as medgru train lists it: the list never gets empty
    card["files"]["training.json"] = sha256_file(model_dir / "training.json")
    for name in files:
        unlisted = dict(card, files={k: v for k, v in card["files"].items() if k != name})
        (model_dir / "card.json").write_text(json.dumps(unlisted))
        with pytest.raises(ValueError, match=f"{name} is not listed"):
            load_model(model_dir, verify=True)
    (model_dir / "card.json").write_text(json.dumps(dict(card, files={})))
    with pytest.raises(ValueError, match="lists no files"):
        load_model(model_dir, verify=True)
    assert type(load_model(model_dir, verify=False)) is cls  # what is checked changed, not what is loaded
    assert cls.MODEL_FILES and set(cls.MODEL_FILES) <= set(files), "MODEL_FILES: the saved files load reads"


def test_set_threshold_survives_save_and_load(trained, tmp_path):
    cls, det = trained
    first = tmp_path / "first"
    first.mkdir()
    _save_with_card(cls, det, first)
    twin = load_model(first)  # an independent copy: the module's fitted detector keeps its threshold
    new = det.threshold + 0.125 * (abs(det.threshold) + 1.0)
    twin.set_threshold(new)
    assert twin.threshold == new and det.threshold != new
    second = tmp_path / "second"
    second.mkdir()
    _save_with_card(cls, twin, second)
    loaded = load_model(second, verify=True)
    assert type(loaded) is cls and loaded.threshold == new
    probe = [seq(texture(6000 + i)) for i in range(2)] + [seq(with_blob(texture(6100), seed=3))]
    # only the threshold changed: the scores are the original model's
    np.testing.assert_allclose(loaded.score_batch(probe), det.score_batch(probe), rtol=1e-6, atol=1e-9)
    d = loaded.detect(probe[-1], explain=False)
    assert d.threshold == new and d.is_anomaly == (d.score > new)
    with pytest.raises(ValueError, match="finite"):
        loaded.set_threshold(float("nan"))
    assert loaded.threshold == new


def test_detectors_calibrate_with_the_one_conformal_threshold():
    for cls in registered_detectors().values():
        module = sys.modules[cls.__module__]
        assert getattr(module, "conformal_threshold", conformal_threshold) is conformal_threshold, cls
    scores = np.arange(40, 0, -1, dtype=np.float64)  # 1..40, unsorted
    assert conformal_threshold(scores, 0.05) == 39.0  # rank ceil(41 * 0.95) = 39
    assert conformal_threshold(scores[:20], 0.05) == 40.0  # 21..40: rank ceil(21 * 0.95) = 20, the largest
    assert conformal_threshold([3.0, 1.0], 0.05) == 3.0  # too few for the rank: the largest
    assert (conformal_min_normals(0.05), conformal_min_normals(0.1), conformal_min_normals(0.01)) == (19, 9, 99)
    with pytest.raises(ValueError):
        conformal_threshold([], 0.05)


def test_get_params_rebuilds_an_untrained_twin(trained):
    cls, det = trained
    params = det.get_params()
    assert json.loads(json.dumps(params)) == params, "params must be JSON-serialisable"
    twin = cls(**params)
    assert type(twin) is cls
    assert twin.get_params() == params
    # the twin learns the same model from the same data and seed
    twin.fit([seq(texture(i)) for i in range(16)], validation=[seq(texture(100 + i)) for i in range(8)], seed=0)
    probe = [seq(texture(5000 + i)) for i in range(3)]
    np.testing.assert_allclose(twin.score_batch(probe), det.score_batch(probe), rtol=1e-4, atol=1e-6)


def _calibrated_copy(cls, det, tmp_path, n: int = 40):
    """An independent copy of the fitted detector (via its folder), calibrated on the scores of ``n`` fresh
    textures: enough normals for the conformal ranks at 5 % and 5 % / 3 to differ."""
    folder = tmp_path / "copy"
    folder.mkdir()
    _save_with_card(cls, det, folder)
    twin = load_model(folder)
    cal = twin.score_batch([seq(texture(7000 + i)) for i in range(n)])
    twin.calibrate(cal, 0.05)
    return twin, np.sort(cal)


def test_a_series_is_judged_by_its_highest_frame_against_the_threshold_for_its_frames(trained, tmp_path):
    cls, det = trained
    twin, cal = _calibrated_copy(cls, det, tmp_path)
    assert twin.threshold == conformal_threshold(cal, 0.05) == cal[38]  # rank ceil(41 * 0.95) = 39
    assert twin.series_threshold(1) == twin.threshold
    assert twin.series_threshold(3) == conformal_threshold(cal, 0.05 / 3) == cal[-1]  # rank 41 > 40: the largest
    assert twin.series_threshold(3) > twin.threshold
    frames = np.concatenate([texture(7100), with_blob(texture(7101), seed=5), texture(7102)])
    d = twin.detect(seq(frames), explain=True)
    assert len(d.frame_scores) == 3
    alone = [float(twin.score_batch([seq(frames[i:i + 1])])[0]) for i in range(3)]
    np.testing.assert_allclose(d.frame_scores, alone, rtol=1e-5, atol=1e-6)  # each frame scored alone
    assert d.score == pytest.approx(max(alone), rel=1e-5, abs=1e-6) and d.score == max(d.frame_scores)
    assert d.threshold == twin.series_threshold(3)
    assert d.is_anomaly == (d.score > twin.series_threshold(3))
    assert d.extras["frame_threshold"] == twin.threshold
    assert d.extras["series_fpr_bound"] == pytest.approx(3 * 1 / 41)  # the largest of 40 scores, 3 frames
    assert float(twin.score_batch([seq(frames)])[0]) == pytest.approx(d.score, rel=1e-5, abs=1e-6)


def test_prior_study_context_frames_are_read_but_not_judged(trained, tmp_path):
    cls, det = trained
    twin, _ = _calibrated_copy(cls, det, tmp_path)
    frames = np.concatenate([with_blob(texture(7200), seed=9), texture(7201), texture(7202)])
    whole = twin.detect(seq(frames), explain=False)
    prior_led = FrameSequence(frames=frames, modality="CR", body_part="CHEST", context_frames=1)
    d = twin.detect(prior_led, explain=True)
    assert d.frame_scores == pytest.approx(whole.frame_scores, rel=1e-5, abs=1e-6)  # every frame is scored
    assert int(np.argmax(whole.frame_scores)) == 0  # the blob leads: it would decide the series
    assert d.score == max(d.frame_scores[1:]) < whole.score  # the prior's frame does not
    assert d.threshold == twin.series_threshold(2)
    assert float(d.heatmaps[0].max()) == 0.0 or cls.registry_name != "medgru-svc"  # MedGRU explains its top frame only
    assert float(twin.score_batch([prior_led])[0]) == pytest.approx(d.score, rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="context_frames"):
        FrameSequence(frames=frames, context_frames=3)


def test_calibration_scores_are_saved_verified_and_dropped_with_a_hand_set_threshold(trained, tmp_path):
    cls, det = trained
    twin, cal = _calibrated_copy(cls, det, tmp_path)
    folder = tmp_path / "calibrated"
    folder.mkdir()
    files = _save_with_card(cls, twin, folder)
    assert "calibration.json" in files
    loaded = load_model(folder)
    np.testing.assert_array_equal(loaded.calibration_scores, cal)
    assert loaded.calibration_alpha == 0.05 and loaded.series_threshold(3) == twin.series_threshold(3)

    card = json.loads((folder / "card.json").read_text())
    unlisted = dict(card, files={k: v for k, v in card["files"].items() if k != "calibration.json"})
    (folder / "card.json").write_text(json.dumps(unlisted))
    with pytest.raises(ValueError, match="calibration.json is not listed"):
        load_model(folder)
    doc = json.loads((folder / "calibration.json").read_text())
    doc["scores"] = [v + 1.0 for v in doc["scores"]]  # scores that do not give the model's threshold
    (folder / "calibration.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="its scores give the threshold"):
        load_model(folder, verify=False)

    loaded = load_model(tmp_path / "copy")  # calibrated by fit, with its own scores
    loaded.set_threshold(loaded.threshold * 1.5 + 1.0)  # by hand: no scores stand behind it
    assert loaded.calibration_scores is None and loaded.series_threshold(3) == loaded.threshold
    hand = tmp_path / "hand"
    hand.mkdir()
    (hand / "calibration.json").write_text("stale")  # as medgru calibrate copies the source's files first
    files = _save_with_card(cls, loaded, hand)
    assert "calibration.json" not in files and not (hand / "calibration.json").exists()
    assert load_model(hand).series_threshold(3) == loaded.threshold


def test_fit_keeps_the_calibration_scores_behind_its_threshold(trained):
    _, det = trained
    cal = det.calibration_scores
    assert cal is not None and cal.size == 8 and det.calibration_alpha is not None
    assert det.threshold == conformal_threshold(cal, det.calibration_alpha)


def test_fit_calibrates_on_each_frame_of_multi_frame_normals_alone(trained):
    """The calibration scores are single-frame scores, as :meth:`series_threshold` assumes: validation
    normals of 2 frames give 2 scores each, those of each frame scored alone (before, a series' highest
    or its ConvGRU score stood for both)."""
    cls, det = trained
    twin = cls(**det.get_params())
    validation = [seq(texture(8000 + i, t=2)) for i in range(10)]
    twin.fit([seq(texture(i)) for i in range(16)], validation=validation, seed=0)
    cal = twin.calibration_scores
    assert cal is not None and cal.size == 20
    alone = twin.score_batch([seq(v.frames[k:k + 1]) for v in validation for k in range(2)])
    np.testing.assert_allclose(cal, np.sort(alone), rtol=1e-4, atol=1e-5)  # batched vs one at a time
