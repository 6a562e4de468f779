import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

from inference.convgru import ConvGRUCell, ConvRecurrentEncoder, global_average_pool


def _conv(x, w, b=0.0):
    """'same' 3x3 cross-correlation of one-channel maps, as torch Conv2d computes it."""
    return correlate2d(x, w, mode="same", boundary="fill") + b


def _sig(v):
    return 1.0 / (1.0 + np.exp(-v))


def test_convgru_cell_matches_the_seed_equations_by_hand():
    torch.manual_seed(0)
    cell = ConvGRUCell(1, 1, kernel_size=3)
    x = np.random.default_rng(0).normal(size=(5, 5))
    h = np.random.default_rng(1).normal(size=(5, 5)) * 0.5
    k = {n: getattr(cell, n).weight.detach().numpy()[0, 0].astype(np.float64)
         for n in ("W_z", "U_z", "W_r", "U_r", "W", "U")}
    b = {n: float(getattr(cell, n).bias.detach()[0]) for n in ("W_z", "W_r", "W")}
    z = _sig(_conv(x, k["W_z"], b["W_z"]) + _conv(h, k["U_z"]))  # eq. 2
    r = _sig(_conv(x, k["W_r"], b["W_r"]) + _conv(h, k["U_r"]))  # eq. 3
    h_tilde = np.tanh(_conv(x, k["W"], b["W"]) + _conv(r * h, k["U"]))  # eq. 4
    expected = (1 - z) * h + z * h_tilde  # eq. 5
    got = cell(torch.tensor(x, dtype=torch.float32)[None, None], torch.tensor(h, dtype=torch.float32)[None, None])
    np.testing.assert_allclose(got.detach().numpy()[0, 0], expected, rtol=1e-4, atol=1e-5)


def test_hand_values_with_fixed_weights():
    cell = ConvGRUCell(1, 1)
    with torch.no_grad():
        for n in ("W_z", "U_z", "W_r", "U_r", "W", "U"):
            getattr(cell, n).weight.zero_()
            getattr(cell, n).weight[0, 0, 1, 1] = 1.0  # centre tap only
        for n in ("W_z", "W_r", "W"):
            getattr(cell, n).bias.zero_()
    x = torch.full((1, 1, 3, 3), 1.0)
    h = torch.full((1, 1, 3, 3), 0.5)
    z = 1 / (1 + np.exp(-1.5))
    r = z
    ht = np.tanh(1.0 + r * 0.5)
    expected = (1 - z) * 0.5 + z * ht
    assert float(cell(x, h)[0, 0, 1, 1].detach()) == pytest.approx(expected, rel=1e-5)
    # h_0 = 0: h_1 = z * tanh(W x + b)
    assert float(cell(x)[0, 0, 0, 0].detach()) == pytest.approx(1 / (1 + np.exp(-1.0)) * np.tanh(1.0), rel=1e-5)


@pytest.mark.parametrize("cell", ["convgru", "convlstm", "none"])
@pytest.mark.parametrize("t", [1, 2, 8])
def test_encoder_runs_over_t_frames(cell, t):
    enc = ConvRecurrentEncoder(6, hidden_channels=4, layers=2, reduce_channels=5, cell=cell)
    out = enc(torch.randn(3, t, 6, 7, 7))
    assert out.shape == (3, 4, 7, 7)
    assert global_average_pool(out).shape == (3, 4)


def test_the_order_of_frames_matters_for_convgru_but_not_without_recurrence():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 3, 5, 5)
    flipped = x.flip(1)
    gru = ConvRecurrentEncoder(3, hidden_channels=2, reduce_channels=0, cell="convgru")
    none = ConvRecurrentEncoder(3, hidden_channels=2, reduce_channels=0, cell="none")
    assert not torch.allclose(gru(x), gru(flipped))
    assert torch.allclose(none(x), none(flipped), atol=1e-6)


def test_unknown_cell_is_rejected():
    with pytest.raises(ValueError):
        ConvRecurrentEncoder(3, cell="transformer")


def test_embed_hidden_is_gap_at_grid_1_and_a_flattened_pooled_map_otherwise():
    from inference.convgru import embed_hidden

    h = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    assert torch.equal(embed_hidden(h, 1), global_average_pool(h))
    g2 = embed_hidden(h, 2)
    assert g2.shape == (2, 3 * 4)
    # channel 0 of sample 0, top-left 2x2 block: 0, 1, 4, 5
    assert float(g2[0, 0]) == pytest.approx(2.5)
    assert torch.equal(embed_hidden(h, 0), h.flatten(1))
    # position matters once flattened: a map and its mirror image share the GAP, not the flat embedding
    m = torch.flip(h, dims=(-1,))
    assert torch.allclose(embed_hidden(m, 1), embed_hidden(h, 1))
    assert not torch.allclose(embed_hidden(m, 2), embed_hidden(h, 2))
    with pytest.raises(ValueError):
        embed_hidden(h, -1)
