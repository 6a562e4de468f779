import numpy as np
import pytest

from inference.preprocess import clahe, preprocess_frames, resize


def _ramp(h=64, w=64):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return (0.3 + 0.2 * x / w + 0.05 * np.sin(y / 3)).astype(np.float32)


def test_clahe_keeps_shape_range_and_raises_local_contrast():
    f = _ramp()
    out = clahe(f, clip_limit=2.0, tile_grid=4)
    assert out.shape == f.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out.std() > f.std() * 1.5  # a low-contrast frame is stretched


def test_clip_limit_zero_disables_enhancement():
    f = _ramp()
    np.testing.assert_array_equal(clahe(f, clip_limit=0), f)


def test_clahe_runs_at_full_bit_depth():
    # two regions 1/4095 apart: 12-bit CLAHE keeps them apart, 8-bit quantisation merges them
    f = np.full((64, 64), 2000 / 4095, dtype=np.float32)
    f[:, 32:] = 2001 / 4095
    hi = clahe(f, bits_stored=12, clip_limit=2.0, tile_grid=2)
    lo = clahe(f, bits_stored=8, clip_limit=2.0, tile_grid=2)
    assert hi[:, 40:].mean() > hi[:, :24].mean()
    assert lo[:, 40:].mean() == pytest.approx(lo[:, :24].mean())


def test_clahe_rejects_a_stack():
    with pytest.raises(ValueError):
        clahe(np.zeros((2, 8, 8), np.float32))


def test_preprocess_frames_resizes_each_frame():
    frames = np.stack([_ramp(100, 80), _ramp(100, 80)])
    out = preprocess_frames(frames, size=32)
    assert out.shape == (2, 32, 32) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert resize(_ramp(10, 10), (20, 30)).shape == (20, 30)


def test_frames_are_resized_to_the_input_size_before_clahe():
    """A large frame is shrunk first and enhanced at the model's size, as the training images (published
    at 224 x 224) were; enhancing at the native size first gives another image."""
    y, x = np.mgrid[0:896, 0:896].astype(np.float32) / 896
    big = (0.35 + 0.25 * x + 0.1 * np.sin(40 * y) * np.exp(-((x - 0.5) ** 2) / 0.05)).astype(np.float32)
    out = preprocess_frames(big[None], size=224)
    np.testing.assert_array_equal(out[0], clahe(resize(big, 224)))
    assert np.abs(out[0] - resize(clahe(big), 224)).mean() > 0.01
    # a frame already at the input size is only enhanced
    small = resize(big, 224)
    np.testing.assert_array_equal(preprocess_frames(small[None], size=224)[0], clahe(small))
