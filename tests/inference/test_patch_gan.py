"""``patch-gan`` beyond the contract: what its score and heat map are made of, and that a fit is
reproducible. Fitted on the contract test's smooth synthetic textures (normals) with ``SMALL_PARAMS``."""

from __future__ import annotations

import numpy as np
import pytest

from inference.api import FrameSequence, ModelCard, Scope, load_model, save_model, sha256_file
from inference.detectors.patch_gan import WEIGHTS_FILE, PatchGANDetector
from tests.inference.test_detector_contract import texture, with_blob


def seq(frames: np.ndarray) -> FrameSequence:
    return FrameSequence(frames=frames, modality="MR", body_part="BRAIN")


NORMALS = [seq(texture(i)) for i in range(16)]
VALIDATION = [seq(texture(100 + i)) for i in range(8)]


@pytest.fixture(scope="module")
def det() -> PatchGANDetector:
    d = PatchGANDetector(**PatchGANDetector.SMALL_PARAMS)
    d.fit(NORMALS, validation=VALIDATION, seed=0)
    return d


def test_a_bright_blob_scores_above_the_same_image_without_it(det):
    clean = [seq(texture(300 + i)) for i in range(6)]
    blobbed = [seq(with_blob(texture(300 + i), seed=i)) for i in range(6)]
    s_clean, s_blob = det.score_batch(clean), det.score_batch(blobbed)
    assert (s_blob > s_clean).all(), (s_blob, s_clean)
    # and the blob is flagged at the calibrated threshold while most clean images are not
    assert (s_blob > det.threshold).all() and (s_clean > det.threshold).sum() <= 1


def test_the_heat_map_is_hottest_on_the_blob(det):
    frames = with_blob(texture(400), seed=2)
    d = det.detect(seq(frames), explain=True)
    on_blob = frames[0] == 1.0
    assert on_blob.any() and d.heatmaps.shape == frames.shape
    assert d.heatmaps[0][on_blob].mean() > d.heatmaps[0][~on_blob].mean() + 0.2
    assert d.extras["max_patch_score"] > 0


def test_both_score_terms_see_the_blob_in_the_patches_it_covers(det):
    """The in-painting error and the discriminator's evidence are each computed per patch; the blob's
    patches have larger in-painting errors than the clean image's same patches."""
    clean = det.resize_frames(texture(500))
    blob = det.resize_frames(with_blob(texture(500), seed=1))
    rec_c, disc_c = det._patch_terms(clean)
    rec_b, disc_b = det._patch_terms(blob)
    g = det.grid
    assert rec_c.shape == disc_c.shape == (1, g, g)
    assert np.isfinite(disc_b).all() and (disc_b >= 0).all()  # -log D is never negative
    p = det.patch_size
    covered = (blob[0] - clean[0] != 0).reshape(g, p, g, p).mean(axis=(1, 3)) > 0.5  # mostly blob
    assert covered.any()
    assert rec_b[0][covered].mean() > 2 * rec_c[0][covered].mean()


def test_the_score_is_the_rank_weighted_mean_of_the_top_k_patches():
    d = PatchGANDetector(image_size=32, patch_size=8, top_k=3)
    patch = np.zeros((2, 4, 4))
    patch[0].flat[[3, 7, 11, 12]] = [5.0, 4.0, 3.0, 2.0]  # the three highest: 5, 4, 3
    patch[1] = -1.0
    expected0 = (1.1 * 5.0 + 1.05 * 4.0 + 1.0 * 3.0) / 3.15
    np.testing.assert_allclose(d._rank(patch), [expected0, -1.0])
    one = PatchGANDetector(image_size=32, patch_size=8, top_k=1)
    assert one._rank(patch)[0] == pytest.approx(5.0)  # top 1: the largest patch


def test_the_fixed_scoring_patterns_mask_every_block_exactly_once():
    for phases, image, patch in ((2, 32, 8), (3, 96, 16), (1, 32, 8)):
        d = PatchGANDetector(image_size=image, patch_size=patch, mask_phases=phases, top_k=1)
        pats = d._patterns().numpy()
        assert pats.shape == (phases * phases, d.grid, d.grid)
        np.testing.assert_array_equal(pats.sum(axis=0), 1.0)
        if phases > 1:  # a masked block's right and lower neighbours are visible in its pattern
            assert not (pats[:, :, 1:] * pats[:, :, :-1]).any() and not (pats[:, 1:] * pats[:, :-1]).any()


def test_save_and_load_give_identical_scores_and_heat_maps(det, tmp_path):
    files = save_model(det, tmp_path)
    assert WEIGHTS_FILE in files
    ModelCard(name="pg", version="0.1", detector="patch-gan", scope=Scope(modalities=("MR",)),
              files={f: sha256_file(tmp_path / f) for f in files}, params=det.get_params()).write(tmp_path)
    loaded = load_model(tmp_path)
    assert isinstance(loaded, PatchGANDetector) and loaded.threshold == det.threshold
    probe = [seq(texture(600 + i)) for i in range(3)] + [seq(with_blob(texture(610), seed=4))]
    np.testing.assert_array_equal(loaded.score_batch(probe), det.score_batch(probe))
    np.testing.assert_array_equal(loaded.detect(probe[-1]).heatmaps, det.detect(probe[-1]).heatmaps)


def test_a_fit_is_reproducible_from_its_seed_and_depends_on_it(det):
    probe = [seq(texture(700 + i)) for i in range(3)] + [seq(with_blob(texture(710), seed=5))]
    same = PatchGANDetector(**PatchGANDetector.SMALL_PARAMS)
    same.fit(NORMALS, validation=VALIDATION, seed=0)
    np.testing.assert_array_equal(same.score_batch(probe), det.score_batch(probe))
    assert same.threshold == det.threshold and same.history == det.history
    other = PatchGANDetector(**PatchGANDetector.SMALL_PARAMS)
    other.fit(NORMALS, validation=VALIDATION, seed=1)
    assert not np.allclose(other.score_batch(probe), det.score_batch(probe))


def test_without_validation_a_share_of_the_normals_is_held_out_for_the_threshold():
    d = PatchGANDetector(**dict(PatchGANDetector.SMALL_PARAMS, epochs=1, holdout_fraction=0.25))
    d.fit(NORMALS, seed=0)
    assert d.calibration_scores is not None and d.calibration_scores.size == 4  # 25 % of 16
    assert len(d.history) == 1 and all(np.isfinite(v) for v in d.history[0].values())


@pytest.mark.parametrize("bad", [{"patch_size": 6}, {"image_size": 36, "patch_size": 8},
                                 {"image_size": 32, "patch_size": 8, "top_k": 17},
                                 {"image_size": 32, "patch_size": 8, "mask_phases": 5},
                                 {"mask_ratio": 1.0}, {"epochs": 0}])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        PatchGANDetector(**bad)


def test_an_untrained_detector_refuses_to_score():
    with pytest.raises(RuntimeError, match="not trained"):
        PatchGANDetector(**PatchGANDetector.SMALL_PARAMS).score_batch([seq(texture(1))])
