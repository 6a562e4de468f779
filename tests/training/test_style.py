"""The lesion-blind style statistics and the style baseline of ``medgru evaluate`` (training/style.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from training.style import (MIN_PER_CLASS, STATS, statistics_matrix, style_baseline, style_statistics,
                            thumbnail_template)


def _texture(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(0.2 + 0.6 * rng.random((size, size)), 0, 1).astype(np.float32)


def test_sharpness_blockiness_foreground_and_framing_measure_what_they_say():
    sharp = _texture(0)
    soft = cv2.GaussianBlur(sharp, (0, 0), 2.0)
    assert style_statistics(sharp, None)["sharpness"] > 3 * style_statistics(soft, None)["sharpness"]
    # 8 x 8 blocks of constant grey: every step sits on a block edge
    blocks = np.kron(np.random.default_rng(1).random((8, 8)), np.ones((8, 8))).astype(np.float32)
    blocks += np.random.default_rng(2).normal(0, 0.002, blocks.shape).astype(np.float32)
    assert style_statistics(blocks, None)["blockiness"] > 10
    assert style_statistics(sharp, None)["blockiness"] == pytest.approx(1.0, abs=0.2)
    half = sharp.copy()
    half[:, :32] = 0.0
    assert style_statistics(half, None)["foreground"] == pytest.approx(0.5, abs=0.01)
    assert style_statistics(np.zeros((16, 16), np.float32), None)["blockiness"] == 1.0
    # framing: 0 for the template's own image, more for the image shifted
    template = thumbnail_template([soft])
    assert style_statistics(soft, template)["framing"] == pytest.approx(0.0, abs=1e-5)
    assert style_statistics(np.roll(soft, 20, axis=1), template)["framing"] > 0.05
    assert np.isnan(style_statistics(soft, None)["framing"])


def test_statistics_matrix_reads_an_iterable_and_matches_the_per_frame_statistics():
    frames = [_texture(i) for i in range(6)]
    template = thumbnail_template(frames[:3])
    x = statistics_matrix(iter(frames), template)
    assert x.shape == (6, len(STATS))
    expected = [[style_statistics(f, template)[k] for k in STATS] for f in frames]
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)


def test_style_baseline_finds_a_style_difference_and_keeps_its_direction():
    # anomalies differ from normals in brightness only: the style baseline separates them
    normals = [_texture(i) * 0.6 for i in range(20)]
    anomalies = [_texture(100 + i) for i in range(20)]
    train, train_normal = normals[:12] + anomalies[:12], [True] * 12 + [False] * 12
    ev, ev_normal = normals[12:] + anomalies[12:], [True] * 8 + [False] * 8
    res = style_baseline(iter(train), train_normal, iter(ev), ev_normal)
    assert res["auroc"] > 0.95 and res["n_train_normal"] == 12 and res["n_train_anomaly"] == 12
    flipped = style_baseline(iter(train), train_normal, iter(ev), [not n for n in ev_normal])
    assert flipped["auroc"] < 0.05
    # no style difference: about chance
    same = [_texture(200 + i) for i in range(40)]
    res = style_baseline(iter(same[:24]), [True, False] * 12, iter(same[24:]), [True, False] * 8)
    assert 0.1 < res["auroc"] < 0.9


def test_style_baseline_is_skipped_with_the_reason_when_a_class_is_too_small():
    frames = [_texture(i) for i in range(MIN_PER_CLASS + 2)]

    def never():
        raise AssertionError("the frames must not be read")
        yield

    res = style_baseline(never(), [True] * (MIN_PER_CLASS + 1) + [False], iter(frames), [True, False] * 3 + [True])
    assert res["auroc"] is None and "needs at least" in res["skipped"] and res["n_train_anomaly"] == 1
