import numpy as np
import pytest
import torch

from inference.convgru import ConvRecurrentEncoder, global_average_pool
from inference.gradcam import grad_cam
from inference.svdd import SVDDBoundary, TorchRBFBoundary


def _toy_encoder() -> ConvRecurrentEncoder:
    """One ConvGRU channel that responds to brightness (centre tap), gates almost open."""
    enc = ConvRecurrentEncoder(1, hidden_channels=1, reduce_channels=0, cell="convgru")
    cell = enc.cells[0]
    with torch.no_grad():
        for name in ("W_z", "U_z", "W_r", "U_r", "W", "U"):
            getattr(cell, name).weight.zero_()
        for name in ("W_z", "W_r", "W"):
            getattr(cell, name).bias.zero_()
        cell.W_z.bias.fill_(4.0)
        cell.W.bias.fill_(-0.5)  # the ~0.25 background maps to ~0
        cell.W.weight[0, 0, 1, 1] = 2.0
        cell.U.weight[0, 0, 1, 1] = 0.5
    return enc.eval()


def _image(rng, anomaly=None):
    img = rng.uniform(0.24, 0.26) + rng.normal(0, 0.02, (16, 16))
    if anomaly:
        y, x = anomaly
        img[y:y + 4, x:x + 4] = 1.0
    return img.astype(np.float32)


def test_heatmap_peaks_on_the_planted_anomaly():
    rng = np.random.default_rng(0)
    enc = _toy_encoder()
    normals = torch.tensor(np.stack([_image(rng) for _ in range(60)]))[:, None, None]  # (N, T=1, 1, H, W)
    with torch.no_grad():
        emb = global_average_pool(enc(normals)).double().numpy()
    head = TorchRBFBoundary(SVDDBoundary(gamma=1.0, nu=0.1).fit(emb))
    frames = np.stack([_image(rng), _image(rng, anomaly=(9, 3))])  # T = 2: anomaly in the last frame
    x = torch.tensor(frames)[None, :, None]
    score, heat = grad_cam(enc.cells[0], lambda: head(global_average_pool(enc(x))), (32, 32))
    assert score > 0  # outside the boundary
    assert heat.shape == (2, 32, 32) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() == 1.0
    peak = np.unravel_index(np.argmax(heat[1]), heat[1].shape)
    assert 18 <= peak[0] < 26 and 6 <= peak[1] < 14  # the planted 4x4 square, upsampled x2
    inside = heat[1, 18:26, 6:14].mean()
    assert inside > heat[1, 0:8, 20:32].mean() * 3


def test_normal_sequence_gives_a_valid_map():
    rng = np.random.default_rng(1)
    enc = _toy_encoder()
    normals = torch.tensor(np.stack([_image(rng) for _ in range(40)]))[:, None, None]
    with torch.no_grad():
        emb = global_average_pool(enc(normals)).double().numpy()
    head = TorchRBFBoundary(SVDDBoundary(gamma=1.0, nu=0.1).fit(emb))
    x = torch.tensor(_image(rng))[None, None, None]
    score, heat = grad_cam(enc.cells[0], lambda: head(global_average_pool(enc(x))), (16, 16))
    assert np.isfinite(score)
    assert heat.shape == (1, 16, 16) and 0.0 <= heat.min() and heat.max() <= 1.0


def test_a_skip_path_term_is_added_inside_the_relu():
    """``extra`` adds the skip path's first-order term to each frame's map before the ReLU."""
    import pytest

    from inference.gradcam import cam_from_states

    h = torch.zeros(1, 2, 3, 3)
    h.grad = torch.zeros_like(h)  # the recurrence contributes nothing here
    a = torch.zeros(1, 4, 3, 3)
    a[0, 1, 0, 2] = 2.0
    a[0, 2, 2, 0] = 5.0
    g = torch.zeros_like(a)
    g[0, 1] = 1.0   # this channel raises the score
    g[0, 2] = -1.0  # this one lowers it: its position stays at zero after the ReLU
    cam = cam_from_states([h], (3, 3), extra=[(a, g)])
    assert cam.shape == (1, 3, 3)
    assert cam[0, 0, 2] > 0.9 and cam[0, 2, 0] == 0.0
    assert float(cam_from_states([h], (3, 3)).max()) == 0.0  # without the term: an all-zero map
    with pytest.raises(ValueError):
        cam_from_states([h, h], (3, 3), extra=[(a, g)])


def test_tiny_gradients_give_the_same_map_as_ordinary_ones():
    """The score is back-propagated with GRADIENT_SCALE: a score whose gradients would be denormal
    (slow on a CPU, and coarse) gives the map of the same score at an ordinary scale."""
    from inference.gradcam import GRADIENT_SCALE

    assert GRADIENT_SCALE > 1 and np.log2(GRADIENT_SCALE) == int(np.log2(GRADIENT_SCALE))  # exact scaling
    torch.manual_seed(0)
    enc = ConvRecurrentEncoder(3, hidden_channels=4, reduce_channels=0)
    x = torch.rand(1, 2, 3, 8, 8)
    weights = torch.rand(4) + 0.5
    maps = {}
    for scale in (1.0, 1e-42):
        _, maps[scale] = grad_cam(enc.cells[0], lambda: scale * (global_average_pool(enc(x))[0] * weights).sum(),
                                  (8, 8))
    assert maps[1.0].max() == pytest.approx(1.0)
    np.testing.assert_allclose(maps[1e-42], maps[1.0], atol=1e-5)
