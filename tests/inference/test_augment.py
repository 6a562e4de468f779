"""Re-framing augmentation (training only): a random zoom / shift / small rotation of a windowed frame."""

from __future__ import annotations

import numpy as np
import pytest

from inference.augment import ReframeParams, reframe, reframe_matrix


def _frame() -> np.ndarray:
    yy, xx = np.mgrid[0:96, 0:80].astype(np.float32)
    return (0.2 + 0.6 * np.exp(-((yy - 48) ** 2 + (xx - 40) ** 2) / 400.0)).astype(np.float32)


def test_zero_ranges_leave_the_frame_as_it_is():
    f = _frame()
    out = reframe(f, np.random.default_rng(0), ReframeParams(scale=0.0, shift=0.0, rotate=0.0))
    assert out.dtype == np.float32 and out.shape == f.shape
    np.testing.assert_allclose(out, f, atol=1e-5)


def test_seeded_and_varied():
    f = _frame()
    a = reframe(f, np.random.default_rng(3))
    b = reframe(f, np.random.default_rng(3))
    c = reframe(f, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.allclose(a, c, atol=1e-3)
    assert a.shape == f.shape and 0.0 <= a.min() and a.max() <= 1.0


def test_zooming_out_brings_black_edges_into_view_and_keeps_the_centre():
    f = np.full((100, 100), 0.5, np.float32)
    p = ReframeParams(scale=0.3, shift=0.0, rotate=0.0)
    rng = np.random.default_rng(0)
    for _ in range(20):  # draw until a zoom-out comes up
        state = rng.bit_generator.state
        zoom = reframe_matrix(f.shape, rng, p)[0, 0]
        if zoom < 0.9:
            rng.bit_generator.state = state
            out = reframe(f, rng, p)
            break
    else:
        pytest.fail("no zoom-out in 20 draws")
    assert out[0, 0] == 0.0 and out[-1, -1] == 0.0  # the corners came from outside the image
    assert out[50, 50] == pytest.approx(0.5, abs=1e-5)


def test_ranges_are_drawn_within_bounds():
    p = ReframeParams(scale=0.15, shift=0.06, rotate=5.0)
    rng = np.random.default_rng(1)
    for _ in range(200):
        m = reframe_matrix((224, 224), rng, p)
        zoom = float(np.hypot(m[0, 0], m[0, 1]))
        angle = float(np.degrees(np.arctan2(m[0, 1], m[0, 0])))
        assert 0.85 - 1e-9 <= zoom <= 1.15 + 1e-9 and abs(angle) <= 5.0 + 1e-9


@pytest.mark.parametrize("bad", [dict(scale=1.0), dict(scale=-0.1), dict(shift=0.5), dict(rotate=90.0)])
def test_out_of_range_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        ReframeParams(**bad)


def test_params_from_train_options_or_a_training_json():
    """``medgru train``'s parsed options and a model's recorded ``command_args`` (strings or numbers) give the
    same ranges; the range checks still apply, and a run without the options is refused, not defaulted."""
    recorded = {"reframe_scale": "0.1", "reframe_shift": 0.05, "reframe_rotate": 3, "seed": 0}
    assert ReframeParams.from_options(recorded) == ReframeParams(scale=0.1, shift=0.05, rotate=3.0)
    with pytest.raises(ValueError):
        ReframeParams.from_options({**recorded, "reframe_scale": 1.0})
    with pytest.raises(KeyError):
        ReframeParams.from_options({"reframe_scale": 0.1})


def test_only_2d_frames():
    with pytest.raises(ValueError, match="2-D"):
        reframe(np.zeros((2, 8, 8), np.float32), np.random.default_rng(0))


def test_a_sequence_is_reframed_with_one_transform_for_all_its_frames():
    from inference.api import FrameSequence
    from inference.augment import reframe_sequence

    f = _frame()
    seq = FrameSequence(frames=np.stack([f, f * 0.5, f]), modality="MR", body_part="BRAIN", bits_stored=12,
                        series_uid="1.2.3", frame_refs=(("1.2.3.1", 1), ("1.2.3.2", 1), ("1.2.3.3", 1)))
    out = reframe_sequence(seq, np.random.default_rng(7))
    assert out.frames.shape == seq.frames.shape and out.frames.dtype == np.float32
    assert np.array_equal(out.frames[0], out.frames[2])  # same frame in, same transform: same frame out
    np.testing.assert_allclose(out.frames[1], out.frames[0] * 0.5, atol=1e-6)
    assert not np.allclose(out.frames[0], f, atol=1e-3)
    assert (out.modality, out.body_part, out.bits_stored) == ("MR", "BRAIN", 12)
    assert out.series_uid == "" and out.frame_refs == ()  # a copy is not the acquired series
    # a single frame draws what reframe() draws: the training cache and the CV twin make the same copy
    one = reframe_sequence(FrameSequence(frames=f[None]), np.random.default_rng(11))
    np.testing.assert_array_equal(one.frames[0], reframe(f, np.random.default_rng(11)))


def test_blur_softens_the_reframed_frame_and_zero_blur_draws_nothing_more():
    """``blur`` smooths the re-framed frame (less high-frequency energy); without it the generator gives the
    numbers it gave before the option existed, so re-framed copies and their cache keys are unchanged."""
    rng = np.random.default_rng(7)
    f = np.clip(0.5 + rng.normal(0, 0.05, (224, 224)), 0, 1).astype(np.float32)  # sigma is in px at 224
    plain = ReframeParams(scale=0.0, shift=0.0, rotate=0.0)
    a = reframe(f, np.random.default_rng(5), plain)
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    reframe(f, r1, plain)
    reframe_matrix(f.shape, r2, plain)
    assert r1.random() == r2.random()  # no draw for the blur when there is none
    assert "blur" not in plain.key() and ReframeParams(blur=1.5).key()["blur"] == 1.5
    blurred = [reframe(f, np.random.default_rng(s), ReframeParams(scale=0.0, shift=0.0, rotate=0.0, blur=3.0))
               for s in range(5)]

    def roughness(x):
        return float(np.abs(np.diff(x, axis=1)).mean())

    assert all(roughness(b) < roughness(a) for b in blurred if not np.array_equal(b, a))
    assert sum(not np.array_equal(b, a) for b in blurred) >= 4
    assert all(b.dtype == np.float32 and b.shape == f.shape for b in blurred)


def test_blur_range_is_checked_and_read_from_older_training_options():
    with pytest.raises(ValueError, match="blur"):
        ReframeParams(blur=-1.0)
    with pytest.raises(ValueError, match="blur"):
        ReframeParams(blur=6.0)
    recorded = {"reframe_scale": 0.15, "reframe_shift": 0.06, "reframe_rotate": 5}
    assert ReframeParams.from_options(recorded).blur == 0.0  # models trained before the option
    assert ReframeParams.from_options({**recorded, "reframe_blur": "1.5"}).blur == 1.5
