"""The frozen channels-last CPU trunk computes the same feature maps as the eager module."""

from __future__ import annotations

import logging

import pytest
import torch

from inference import backbone as bb


@pytest.fixture()
def eager_maps():
    net = bb.load_backbone("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 96, 128, generator=g)
    with torch.no_grad():
        return net, x, net(x)


@pytest.mark.parametrize("size", [(96, 128), (64, 64)])
def test_optimised_trunk_matches_eager(size):
    net = bb.load_backbone("cpu")
    x = torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
    out = bb.extract_feature_maps(x, net)
    assert bb._FAST.get((id(net), "cpu", size)) is not None, "the frozen trunk was not used"
    assert out.shape == ref.shape == (2, bb.FEATURE_CHANNELS, size[0] // 16, size[1] // 16)
    assert out.is_contiguous()
    assert torch.allclose(out, ref, atol=1e-3, rtol=1e-4), float((out - ref).abs().max())


def test_batches_and_greyscale_3d_input(eager_maps):
    net, x, ref = eager_maps
    out = bb.extract_feature_maps(x[:, 0], net, batch_size=2)  # (B, H, W), two batches
    assert torch.allclose(out, ref, atol=1e-3, rtol=1e-4)


def test_switch_off_uses_eager(eager_maps, monkeypatch):
    net, x, ref = eager_maps
    monkeypatch.setattr(bb, "_FAST", {})
    bb.set_optimised(False)
    try:
        out = bb.extract_feature_maps(x, net)
    finally:
        bb.set_optimised(True)
    assert bb._FAST == {}
    assert torch.equal(out, ref)


def test_trace_failure_falls_back_to_eager(eager_maps, monkeypatch, caplog):
    net, x, ref = eager_maps
    monkeypatch.setattr(bb, "_FAST", {})
    monkeypatch.setattr(bb, "_FAST_FAILED", set())

    def broken(*a, **k):
        raise RuntimeError("tracing unsupported here")

    monkeypatch.setattr(torch.jit, "trace", broken)
    with caplog.at_level(logging.WARNING, logger="inference.backbone"):
        out = bb.extract_feature_maps(x, net)
        again = bb.extract_feature_maps(x, net)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert sum("eager PyTorch" in r.getMessage() for r in caplog.records) == 1  # warned once, not per call
