"""Convolutional recurrent cells over a sequence of feature maps (the seed's eqs. 2-5).

:class:`ConvGRUCell` implements exactly::

    z_t = sigmoid(W_z * X_t + U_z * h_{t-1} + b_z)            (2)  update gate
    r_t = sigmoid(W_r * X_t + U_r * h_{t-1} + b_r)            (3)  reset gate
    h~_t = tanh(W * X_t + U * (r_t . h_{t-1}) + b)            (4)  candidate
    h_t = (1 - z_t) . h_{t-1} + z_t . h~_t                    (5)  hidden state

with ``*`` a 3 x 3 ("same" padded) convolution and ``.`` the element-wise product; ``W`` convolutions
carry the biases, ``U`` convolutions have none. ``h_0 = 0``. With ``T = 1`` the output is
``z_1 . tanh(W * X_1 + b)``, which is a valid (gated) single-frame embedding.

:class:`ConvLSTMCell` (Shi et al. 2015, without peepholes) and :class:`NoRecurrenceCell` (the same
candidate convolution applied to each frame independently, ``h_t = tanh(W * X_t + b)``, and the frames'
states averaged) exist for the ablation.

:class:`ConvRecurrentEncoder` stacks ``layers`` cells (``hidden_channels`` each) after an optional
1 x 1 reducer, runs them over ``T`` and returns the last hidden state of the top layer ``h_T``
``(B, C, H, W)``; :func:`global_average_pool` turns it into the embedding ``e`` (the seed's eq. 6 with
GAP, as described in its section 3.1). :func:`embed_hidden` is the general form: GAP, or the seed's other
option, flattening ``h_T`` (at full resolution, or after average pooling to a ``g x g`` grid, which keeps
where in the image a feature sits at a size an RBF boundary can handle).
"""

from __future__ import annotations

import torch
from torch import nn

CELL_TYPES = ("convgru", "convlstm", "none")


class ConvGRUCell(nn.Module):
    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        self.hidden_channels = hidden_channels
        self.W_z = nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=pad, bias=True)
        self.U_z = nn.Conv2d(hidden_channels, hidden_channels, kernel_size, padding=pad, bias=False)
        self.W_r = nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=pad, bias=True)
        self.U_r = nn.Conv2d(hidden_channels, hidden_channels, kernel_size, padding=pad, bias=False)
        self.W = nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=pad, bias=True)
        self.U = nn.Conv2d(hidden_channels, hidden_channels, kernel_size, padding=pad, bias=False)

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return x.new_zeros(b, self.hidden_channels, h, w)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        if h is None:  # h_0 = 0: U * 0 = 0, so eqs. 2-5 reduce to h_1 = z . tanh(W * X + b)
            z = torch.sigmoid(self.W_z(x))
            return z * torch.tanh(self.W(x))
        z = torch.sigmoid(self.W_z(x) + self.U_z(h))
        r = torch.sigmoid(self.W_r(x) + self.U_r(h))
        h_tilde = torch.tanh(self.W(x) + self.U(r * h))
        return (1 - z) * h + z * h_tilde


class ConvLSTMCell(nn.Module):
    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        self.hidden_channels = hidden_channels
        self.W = nn.Conv2d(in_channels, 4 * hidden_channels, kernel_size, padding=pad, bias=True)
        self.U = nn.Conv2d(hidden_channels, 4 * hidden_channels, kernel_size, padding=pad, bias=False)

    def init_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        z = x.new_zeros(b, self.hidden_channels, h, w)
        return z, z.clone()

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = self.init_state(x) if state is None else state
        i, f, o, g = torch.chunk(self.W(x) + self.U(h), 4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class NoRecurrenceCell(nn.Module):
    """``h_t = tanh(W * X_t + b)``: no state carried between frames (ablation)."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.W = nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=kernel_size // 2, bias=True)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.W(x))


def make_cell(cell: str, in_channels: int, hidden_channels: int, kernel_size: int = 3) -> nn.Module:
    if cell == "convgru":
        return ConvGRUCell(in_channels, hidden_channels, kernel_size)
    if cell == "convlstm":
        return ConvLSTMCell(in_channels, hidden_channels, kernel_size)
    if cell == "none":
        return NoRecurrenceCell(in_channels, hidden_channels, kernel_size)
    raise ValueError(f"unknown cell {cell!r}; choose one of {CELL_TYPES}")


class ConvRecurrentEncoder(nn.Module):
    """1 x 1 reducer -> ``layers`` stacked recurrent cells over T -> last hidden state ``h_T``.

    Input ``(B, T, C_in, H, W)``; output ``(B, hidden_channels, H, W)``. For ``cell="none"`` the output
    is the mean over frames of the per-frame states (no recurrence, same shape).
    """

    def __init__(self, in_channels: int, hidden_channels: int = 64, layers: int = 1,
                 reduce_channels: int | None = 128, cell: str = "convgru", kernel_size: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError("layers must be >= 1")
        self.cell_type = cell
        if reduce_channels:
            self.reducer: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, reduce_channels, kernel_size=1, bias=True), nn.ReLU(inplace=False)
            )
            c = reduce_channels
        else:
            self.reducer = nn.Identity()
            c = in_channels
        self.cells = nn.ModuleList()
        for _ in range(layers):
            self.cells.append(make_cell(cell, c, hidden_channels, kernel_size))
            c = hidden_channels
        self.out_channels = hidden_channels

    def forward(self, x: torch.Tensor, *, with_inputs: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``h_T``; with ``with_inputs`` also the recurrence's inputs, the reduced frames ``(B, T, C_r, H, W)``."""
        if x.ndim == 4:  # (B, C, H, W): a single frame
            x = x[:, None]
        b, t = x.shape[:2]
        flat = self.reducer(x.flatten(0, 1))
        reduced = seq = flat.view(b, t, *flat.shape[1:])
        if self.cell_type == "none":
            for cell in self.cells:
                outs = [cell(seq[:, i]) for i in range(t)]
                seq = torch.stack(outs, dim=1)
            h = seq.mean(dim=1)
        else:
            for cell in self.cells:
                state = None
                outs = []
                for i in range(t):
                    state = cell(seq[:, i], state)
                    outs.append(state[0] if isinstance(state, tuple) else state)
                seq = torch.stack(outs, dim=1)
            h = seq[:, -1]
        return (h, reduced) if with_inputs else h


def global_average_pool(h: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> embedding ``(B, C)``."""
    return h.mean(dim=(-2, -1))


def embed_hidden(h: torch.Tensor, grid: int = 1) -> torch.Tensor:
    """``(B, C, H, W)`` -> embedding. ``grid=1``: GAP, ``(B, C)``; ``grid=g > 1``: ``h`` average-pooled
    to ``g x g`` (adaptive bins) and flattened, ``(B, C g^2)``; ``grid=0``: ``h`` flattened as it is,
    ``(B, C H W)``. Differentiable in every form (Grad-CAM goes through it)."""
    if grid < 0:
        raise ValueError(f"grid must be >= 0, got {grid}")
    if grid == 1:
        return global_average_pool(h)
    if grid > 1:
        h = nn.functional.adaptive_avg_pool2d(h, grid)
    return h.flatten(1)
