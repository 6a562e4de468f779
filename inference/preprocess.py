"""The detector's own preprocessing: CLAHE (the seed's adaptive histogram equalisation, eq. 1) and resize.

Windowing assumptions: frames arrive from the pipeline already windowed to float32 ``[0, 1]`` (modality
LUT and VOI applied, MONOCHROME1 inverted; see :class:`inference.api.FrameSequence`). Nothing here
re-windows. ``bits_stored`` says how many grey levels the frames came from: CLAHE's histogram is built
at that depth (OpenCV CLAHE on ``uint8`` when ``bits_stored <= 8``, on ``uint16`` quantised to
``2**bits_stored`` levels otherwise), so 12-16-bit DICOM can keep its full contrast resolution instead
of being crushed to 256 levels first. The two enhance differently (OpenCV's clip limit is relative to
the histogram's bin count), so a detector passes the depth its training data had: MedGRU-SVC caps it at
``MedGRUSVC.clahe_bits`` (8, the depth of the image files it is trained on).

The order is resize to the model's input size first (area interpolation when shrinking, bilinear when
enlarging), then CLAHE at that size. That is how the training images came to be: both benchmark sets
were resized to 224 x 224 by their publishers and enhanced here, so a 2,000-pixel radiograph must be too.
CLAHE at the native size and then shrinking gives another image (the tile grid covers the same anatomy,
but each tile's histogram holds 64 times the pixels): on Kermany test images enlarged eight times, the
bundled chest model changed 52 of 624 verdicts against the files' that way and 16 this way (Spearman of
the scores 0.971 and 0.996; ``benchmarks/results/serving_consistency.md``). Until 2026-12-04 the order
was the other one.
"""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_CLIP_LIMIT = 2.0
DEFAULT_TILE_GRID = 8


def clahe(frame: np.ndarray, *, bits_stored: int = 8, clip_limit: float = DEFAULT_CLIP_LIMIT,
          tile_grid: int = DEFAULT_TILE_GRID) -> np.ndarray:
    """CLAHE of one float frame in ``[0, 1]`` at ``bits_stored`` bits; returns float32 in ``[0, 1]``.

    ``clip_limit <= 0`` disables the enhancement (the frame is returned as float32, unchanged).
    """
    f = np.asarray(frame, dtype=np.float32)
    if f.ndim != 2:
        raise ValueError(f"clahe expects one 2-D frame, got shape {f.shape}")
    if clip_limit <= 0:
        return f.copy()
    bits = int(min(max(bits_stored, 1), 16))
    levels = (1 << bits) - 1
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid)))
    if bits <= 8:
        q = np.rint(np.clip(f, 0.0, 1.0) * levels).astype(np.uint8)
        if levels != 255:  # spread a low-depth image over the 8-bit range
            q = (q.astype(np.uint16) * 255 // levels).astype(np.uint8)
        return op.apply(q).astype(np.float32) / 255.0
    # OpenCV's uint16 CLAHE uses a 65536-bin histogram: scale the bits_stored levels onto it
    q = np.rint(np.clip(f, 0.0, 1.0) * levels).astype(np.uint32)
    q16 = (q * 65535 // levels).astype(np.uint16)
    return op.apply(q16).astype(np.float32) / 65535.0


def resize(frame: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize one frame to ``size`` (``int`` = square; ``(H, W)``)."""
    h, w = (size, size) if isinstance(size, int) else size
    if frame.shape == (h, w):
        return frame.astype(np.float32, copy=False)
    shrink = frame.shape[0] > h or frame.shape[1] > w
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(frame.astype(np.float32, copy=False), (w, h), interpolation=interp)


def preprocess_frames(frames: np.ndarray, *, bits_stored: int = 8, size: int | tuple[int, int] = 224,
                      clip_limit: float = DEFAULT_CLIP_LIMIT, tile_grid: int = DEFAULT_TILE_GRID
                      ) -> np.ndarray:
    """``(T, H, W)`` frames in [0, 1] -> resized, then CLAHE'd ``(T, size, size)`` float32 in [0, 1]."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    out = [
        clahe(resize(f, size), bits_stored=bits_stored, clip_limit=clip_limit, tile_grid=tile_grid)
        for f in frames
    ]
    return np.clip(np.stack(out), 0.0, 1.0).astype(np.float32)
