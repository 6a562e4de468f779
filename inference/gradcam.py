"""Grad-CAM (Selvaraju et al. 2017; the seed's eq. 8) of the anomaly score on recurrent hidden states.

The recurrent cell is called once per frame; a forward hook on it records every hidden state ``h_t``
(``A^k`` of eq. 8, one set per frame) and keeps its gradient. After back-propagating the (differentiable)
SVDD anomaly score, frame ``t`` gets

    L_t = ReLU( sum_k alpha_k^t A_t^k ),   alpha_k^t = mean over (i, j) of d score / d A_t^k(i, j)

computed through the recurrence (so an early frame is credited for what it carried into ``h_T``). Where
the embedding also takes a skip block around the recurrence (``skip="reduced"``), ``extra`` gives per frame
that block's activations ``R_t`` and the score's gradient through the skip alone, and their linear term
``sum_j beta_j^t R_t^j`` is added inside the ReLU: the map is then the first-order contribution of each
position through both paths. The maps
are bilinearly upsampled to the input frame size and divided by the largest value over the whole
sequence, so they lie in ``[0, 1]`` and frames stay comparable; an all-zero map stays zero.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class HiddenStateRecorder:
    """Forward hook on a recurrent cell: records each output hidden state and retains its gradient."""

    def __init__(self, cell: nn.Module):
        self.states: list[torch.Tensor] = []
        self._handle = cell.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output) -> None:
        h = output[0] if isinstance(output, tuple) else output
        if h.requires_grad:
            h.retain_grad()
        self.states.append(h)

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "HiddenStateRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _linear_term(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_k alpha_k A^k`` with ``alpha_k`` the spatial mean of the gradient: ``(1, C, h, w)`` -> ``(1, 1, h, w)``."""
    return (g.mean(dim=(-2, -1), keepdim=True) * a).sum(dim=1, keepdim=True)


def cam_from_states(states: list[torch.Tensor], out_size: tuple[int, int],
                    extra: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> np.ndarray:
    """Grad-CAM maps ``(T, H, W)`` in [0, 1] from recorded states (batch of one) with gradients;
    ``extra``: per frame ``(activation, gradient)`` of a skip path, added before the ReLU."""
    if extra is not None and len(extra) != len(states):
        raise ValueError(f"{len(extra)} skip terms for {len(states)} recorded states")
    maps = []
    for t, h in enumerate(states):
        g = h.grad if h.grad is not None else torch.zeros_like(h)
        lin = _linear_term(h, g)
        if extra is not None:
            a, ga = extra[t]
            lin = lin + _linear_term(a, ga)
        maps.append(F.relu(lin))  # (1, 1, h, w)
    cam = torch.cat(maps, dim=0).detach()
    cam = F.interpolate(cam, size=out_size, mode="bilinear", align_corners=False)[:, 0]
    cam = cam.clamp_min(0)
    top = float(cam.max())
    if top > 0 and np.isfinite(top):
        cam = cam / top
    out = cam.cpu().numpy().astype(np.float32)
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)


#: the score is back-propagated with this weight (a power of two, so the scaling itself is exact): the
#: maps are normalised to their maximum, so it cancels, but it keeps small gradients out of the denormal
#: range, where a CPU computes them many times more slowly (7.0.0 chest, an RBF score with a small
#: kernel width on a GAP embedding: its ConvGRU backward took 4x as long per convolution as 5.0.0's)
GRADIENT_SCALE = 2.0 ** 30


def grad_cam(cell: nn.Module, forward_score: Callable[[], torch.Tensor], out_size: tuple[int, int],
             extra: Callable[[], list[tuple[torch.Tensor, torch.Tensor]] | None] | None = None
             ) -> tuple[float, np.ndarray]:
    """Run ``forward_score()`` (which must call ``cell`` once per frame, batch of one, and return the
    scalar anomaly score), back-propagate it and return ``(score, heatmaps (T, H, W))``.

    If the cell is called more than once per frame (stacked layers share no cell, so this does not
    happen with :class:`~inference.convgru.ConvRecurrentEncoder`), every call yields a map. ``extra``,
    called after the backward pass, returns the skip path's per-frame ``(activation, gradient)`` or None.
    """
    with HiddenStateRecorder(cell) as rec, torch.enable_grad():
        score = forward_score()
        if score.numel() != 1:
            raise ValueError("grad_cam needs a scalar score (one sequence)")
        score = score.reshape(())
        if score.requires_grad:
            score.backward(torch.tensor(GRADIENT_SCALE, dtype=score.dtype, device=score.device))
        heat = cam_from_states(rec.states, out_size, extra() if extra is not None else None)
    return float(score.detach()), heat
