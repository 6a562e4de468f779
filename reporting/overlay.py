"""Rendering of the Grad-CAM overlay picture (pure numpy/OpenCV, no DICOM).

Layout of the RGB picture, top to bottom::

    +-------------------------------------------------------+
    | caption band (black): NOT FOR DIAGNOSTIC USE (yellow)  |
    |   model name + version / score, threshold, verdict     |
    +--------------------------------------------+----------+
    | windowed grey image with the heat map      | colour   |
    | blended in (jet colours; heat below LOW     | bar 0..1 |
    | stays grey, the opacity grows with heat)    | + ticks  |
    +--------------------------------------------+----------+

The image is resized so that its short side is at least :data:`MIN_SHORT_SIDE` pixels (text stays
legible on small MR slices) and its long side at most :data:`MAX_LONG_SIDE` (large radiographs stay
small enough to send).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

MIN_SHORT_SIDE = 512
MAX_LONG_SIDE = 1536
HEAT_LOW = 0.2  # below this the image stays grey
MAX_ALPHA = 0.6  # opacity of the colour at heat 1
CAPTION_COLOUR = (255, 255, 0)  # yellow warning line (RGB)
TEXT_COLOUR = (255, 255, 255)
ABNORMAL_COLOUR = (255, 80, 80)
NORMAL_COLOUR = (120, 255, 120)
COLORMAP = cv2.COLORMAP_JET
FONT = cv2.FONT_HERSHEY_SIMPLEX


def check_unit_image(name: str, array: np.ndarray) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, not {type(array).__name__}")
    if array.ndim != 2 or array.shape[0] < 2 or array.shape[1] < 2:
        raise ValueError(f"{name} must have shape (H, W), got {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be a float array in [0, 1], got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinity")
    if array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}]")
    return array.astype(np.float32, copy=False)


def output_size(height: int, width: int) -> tuple[int, int]:
    """(H, W) of the image area: short side >= MIN_SHORT_SIDE, long side <= MAX_LONG_SIDE (aspect kept)."""
    scale = max(1.0, MIN_SHORT_SIDE / min(height, width))
    scale = min(scale, MAX_LONG_SIDE / max(height, width)) if max(height, width) * scale > MAX_LONG_SIDE else scale
    return max(2, round(height * scale)), max(2, round(width * scale))


#: a pixel aspect (row spacing / column spacing) this close to 1 is shown as square; one outside the range
#: is taken for an error in the source's header and ignored
ASPECT_TOLERANCE = 0.01
ASPECT_RANGE = (0.1, 10.0)


def square_pixels(frame: np.ndarray, heatmap: np.ndarray, aspect: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``frame`` and ``heatmap`` resampled so that their pixels are square, for pixels ``aspect`` times as
    tall as wide (row spacing / column spacing). A viewer shows the source with its pixel spacing, the SC
    (which has none) with square pixels: without this the overlay is stretched against the anatomy the
    radiologist sees. The longer side grows; nothing is cropped."""
    if aspect is None or not np.isfinite(aspect) or not ASPECT_RANGE[0] <= aspect <= ASPECT_RANGE[1]:
        return frame, heatmap
    if abs(aspect - 1.0) <= ASPECT_TOLERANCE:
        return frame, heatmap
    h, w = frame.shape
    if aspect > 1.0:
        h = max(2, round(h * aspect))
    else:
        w = max(2, round(w / aspect))
    out = [np.clip(cv2.resize(a.astype(np.float32, copy=False), (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
           for a in (frame, heatmap)]
    return out[0], out[1]


def colourise(heat: np.ndarray) -> np.ndarray:
    """Heat in [0, 1] (H, W) -> RGB uint8 colours of the colour map."""
    bgr = cv2.applyColorMap(np.clip(heat * 255.0 + 0.5, 0, 255).astype(np.uint8), COLORMAP)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def blend(frame: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Grey frame + heat map -> RGB uint8; where heat < HEAT_LOW the grey image is untouched."""
    grey = np.repeat((frame * 255.0)[..., None], 3, axis=2)
    alpha = np.clip((heat - HEAT_LOW) / (1.0 - HEAT_LOW), 0.0, 1.0) * MAX_ALPHA
    colour = colourise(heat).astype(np.float32)
    out = grey * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _fit_scale(text: str, max_width: int, height: int, thickness: int) -> float:
    scale = height / 22.0  # Hershey simplex: about 22 px high at scale 1
    (w, _), _ = cv2.getTextSize(text, FONT, scale, thickness)
    if w > max_width:
        scale *= max_width / w
    return scale


def _put(img: np.ndarray, text: str, x: int, y: int, scale: float, colour, thickness: int) -> None:
    cv2.putText(img, text, (x, y), FONT, scale, colour, thickness, cv2.LINE_AA)


def render_overlay(
    frame: np.ndarray,
    heatmap: np.ndarray,
    lines: Sequence[tuple[str, tuple[int, int, int]]],
) -> np.ndarray:
    """The finished picture as RGB uint8 ``(H', W', 3)``.

    ``lines`` are the caption lines with their RGB colour, top first (the first is the warning).
    """
    frame = check_unit_image("frame", frame)
    heatmap = check_unit_image("heatmap", heatmap)
    if frame.shape != heatmap.shape:
        raise ValueError(f"frame {frame.shape} and heatmap {heatmap.shape} differ in shape")
    h, w = output_size(*frame.shape)
    f = cv2.resize(frame, (w, h), interpolation=cv2.INTER_CUBIC if h > frame.shape[0] else cv2.INTER_AREA)
    hm = cv2.resize(heatmap, (w, h), interpolation=cv2.INTER_LINEAR)
    image = blend(np.clip(f, 0.0, 1.0), np.clip(hm, 0.0, 1.0))

    line_h = max(16, round(min(h, w) / 24))
    thickness = max(1, line_h // 12)
    pad = max(6, line_h // 2)
    bar_w = max(16, w // 28)
    tick_label_w = cv2.getTextSize("1.0", FONT, line_h / 30.0, thickness)[0][0]
    panel_w = pad + bar_w + pad // 2 + tick_label_w + pad
    caption_h = pad + len(lines) * (line_h + pad)
    # the colour bar needs room for its label, a ramp and its end ticks: a very flat image (long side capped
    # at MAX_LONG_SIDE, so a 20 x 1000 frame is 31 rows high) gets a black band below it instead of a bar of
    # negative height, which raised and failed the job (no SR either)
    area_h = max(h, 2 * pad + 6 * line_h)
    canvas = np.zeros((caption_h + area_h, w + panel_w, 3), np.uint8)
    canvas[caption_h:caption_h + h, :w] = image

    # caption band
    y = pad + line_h
    for text, colour in lines:
        scale = _fit_scale(text, canvas.shape[1] - 2 * pad, line_h, thickness)
        _put(canvas, text, pad, y, scale, colour, thickness)
        y += line_h + pad

    # colour bar: 1.0 at the top, 0.0 at the bottom, with ticks
    top, bottom = caption_h + pad + line_h, caption_h + area_h - pad - line_h // 2
    x0 = w + pad
    ramp = np.linspace(1.0, 0.0, bottom - top, dtype=np.float32)[:, None].repeat(bar_w, axis=1)
    canvas[top:bottom, x0:x0 + bar_w] = colourise(ramp)
    cv2.rectangle(canvas, (x0 - 1, top - 1), (x0 + bar_w, bottom), TEXT_COLOUR, 1)
    tick_scale = line_h / 30.0
    for value in (1.0, 0.75, 0.5, 0.25, 0.0):
        ty = round(bottom - 1 - value * (bottom - top - 1))
        cv2.line(canvas, (x0 + bar_w, ty), (x0 + bar_w + pad // 3, ty), TEXT_COLOUR, 1)
        if value in (1.0, 0.5, 0.0):
            _put(canvas, f"{value:.1f}", x0 + bar_w + pad // 2, ty + line_h // 4, tick_scale, TEXT_COLOUR, 1)
    _put(canvas, "heat", x0, caption_h + pad // 2 + line_h // 2, tick_scale * 0.9, TEXT_COLOUR, 1)
    # even width: some viewers dislike odd RGB row lengths; harmless otherwise
    if canvas.shape[1] % 2:
        canvas = np.concatenate([canvas, np.zeros((canvas.shape[0], 1, 3), np.uint8)], axis=1)
    return canvas


def pick_frame(heatmaps: np.ndarray) -> int:
    """Index of the frame to show: the highest peak heat; ties go to the larger mean heat, then the first."""
    if not isinstance(heatmaps, np.ndarray) or heatmaps.ndim != 3 or heatmaps.shape[0] < 1:
        raise ValueError(f"heatmaps must be an array of shape (T, H, W) with T >= 1, "
                         f"got {getattr(heatmaps, 'shape', type(heatmaps).__name__)}")
    flat = heatmaps.reshape(heatmaps.shape[0], -1).astype(np.float64)
    peaks, means = flat.max(axis=1), flat.mean(axis=1)
    order = np.lexsort((np.arange(len(peaks)), -means, -peaks))
    return int(order[0])
