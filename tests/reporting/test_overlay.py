"""The overlay picture itself (reporting.overlay): shapes the service can be given."""

from __future__ import annotations

import numpy as np
import pytest

from reporting.overlay import CAPTION_COLOUR, TEXT_COLOUR, output_size, render_overlay

LINES = [("NOT FOR DIAGNOSTIC USE", CAPTION_COLOUR), ("model v1", TEXT_COLOUR), ("score 1 / threshold 0.5", TEXT_COLOUR)]


@pytest.mark.parametrize("shape", [(20, 1000), (30, 1536), (40, 1536), (4, 300), (1000, 20), (2, 2)])
def test_extreme_aspect_ratios_render_with_their_colour_bar(shape: tuple[int, int]) -> None:
    """A frame far wider than tall has its long side capped, which leaves an image area too low for the
    colour bar: render_overlay raised (a bar of negative height) and the job failed without SR or SC.
    The picture is made, the image sits under the caption unchanged in size, and the bar is drawn."""
    rng = np.random.default_rng(0)
    frame = rng.random(shape, dtype=np.float32)
    heat = np.zeros(shape, np.float32)
    out = render_overlay(frame, heat, LINES)
    h, w = output_size(*shape)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[1] >= w
    assert out.shape[0] > h
    panel = out[:, w:]
    colourful = (panel.max(axis=2).astype(int) - panel.min(axis=2)) > 100  # the jet ramp
    assert colourful.sum() > 50
