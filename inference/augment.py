"""Re-framing: a normal image as another acquisition would have framed it (training augmentation only).

Radiographs of the same anatomy differ in field of view, centring and tilt from one technician, room or
site to the next. A one-class model trained on normals framed one way learns that framing as part of
"normal" and flags normals framed otherwise, whatever their anatomy. On the Kermany benchmark the train
split's normals are framed more uniformly than its pneumonia images or than the test split's normals,
so a template-correlation score that sees nothing but framing separates the train split's classes
(``benchmarks/results/medgru-v7.md``).

:func:`reframe` applies one random similarity transform (zoom, shift, small rotation) to a windowed frame
before CLAHE, filling what comes into view with black, as a collimated edge looks, and, with a blur range
(``--reframe-blur``), then blurs it by a random Gaussian: on Kermany the train split's normals are also
sharper than its pneumonia images (``benchmarks/results/blur-v10-kermany_cxr.md``). ``medgru train
--reframe-copies K`` adds K such copies of every fit normal to the ConvGRU's and the boundary's training
set; the HPO and calibration normals stay as acquired. Nothing here runs at inference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import cv2
import numpy as np

from inference.api import FrameSequence

#: bump when :func:`reframe` changes (feature caches key on it)
REFRAME_VERSION = 1


@dataclass(frozen=True)
class ReframeParams:
    """Ranges of the random similarity transform (uniform; the zoom uniform in log scale)."""

    #: zoom factor drawn from [1 - scale, 1 + scale] (log-uniform)
    scale: float = 0.15
    #: shift along each axis, as a fraction of that axis' length
    shift: float = 0.06
    #: rotation in degrees, either way
    rotate: float = 5.0
    #: largest Gaussian blur sigma, in pixels of a frame whose short side is 224 (scaled with it); drawn
    #: from [0, blur] after the transform, so that sharpness alone is not taken for normality (0 = none)
    blur: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.scale < 1:
            raise ValueError(f"reframe scale must be in [0, 1), got {self.scale}")
        if not 0 <= self.shift < 0.5:
            raise ValueError(f"reframe shift must be in [0, 0.5), got {self.shift}")
        if not 0 <= self.rotate <= 45:
            raise ValueError(f"reframe rotation must be in [0, 45] degrees, got {self.rotate}")
        if not 0 <= self.blur <= 5:
            raise ValueError(f"reframe blur must be in [0, 5] pixels, got {self.blur}")

    def key(self) -> dict:
        key = {"v": REFRAME_VERSION, **asdict(self)}
        if not self.blur:  # transforms without blur keep the cache keys they had before the option
            del key["blur"]
        return key

    def describe(self) -> str:
        """The ranges in words, as model cards and CV settings give them."""
        return (f"zoom 1 +/- {self.scale:g}, shift +/- {self.shift:g}, rotation +/- {self.rotate:g} degrees"
                + (f", then a Gaussian blur of sigma 0-{self.blur:g} px at 224" if self.blur else ""))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "ReframeParams":
        """The ranges of ``medgru train``'s ``--reframe-scale``, ``--reframe-shift`` and ``--reframe-rotate``:
        its parsed options (``vars(args)``) or a model's ``training.json`` ``command_args``."""
        return cls(scale=float(options["reframe_scale"]), shift=float(options["reframe_shift"]),
                   rotate=float(options["reframe_rotate"]),
                   # models trained before the option have no blur
                   blur=float(options.get("reframe_blur", 0.0)))


def reframe_matrix(shape: tuple[int, int], rng: np.random.Generator, params: ReframeParams = ReframeParams()
                   ) -> np.ndarray:
    """The 2x3 affine matrix of one random re-framing of a ``shape`` = ``(H, W)`` frame."""
    h, w = shape
    zoom = float(np.exp(rng.uniform(np.log(1 - params.scale), np.log(1 + params.scale)))) if params.scale else 1.0
    angle = float(rng.uniform(-params.rotate, params.rotate))
    tx, ty = rng.uniform(-params.shift, params.shift, 2) * (w, h)
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, zoom)
    m[:, 2] += (tx, ty)
    return m


def reframe(frame: np.ndarray, rng: np.random.Generator, params: ReframeParams = ReframeParams()) -> np.ndarray:
    """One random re-framing of a 2-D windowed frame (float in [0, 1]); same shape and dtype float32.
    With ``params.blur`` the re-framed frame is then blurred (:func:`blur_sigma`)."""
    f = np.asarray(frame, dtype=np.float32)
    if f.ndim != 2:
        raise ValueError(f"reframe expects one 2-D frame, got shape {f.shape}")
    out = _warp(f, reframe_matrix(f.shape, rng, params))
    return _blur(out, blur_sigma(f.shape, rng, params))


def blur_sigma(shape: tuple[int, int], rng: np.random.Generator, params: ReframeParams) -> float:
    """The Gaussian sigma (pixels of a ``shape`` frame) of one re-framing's blur: uniform in
    ``[0, params.blur]`` at a short side of 224, scaled to ``shape``. Draws nothing when ``params.blur`` is 0,
    so that re-framings without blur stay the numbers they were."""
    if not params.blur:
        return 0.0
    return float(rng.uniform(0.0, params.blur)) * min(shape) / 224.0


def _blur(frame: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.05:  # a kernel narrower than this leaves the frame as it is (and OpenCV's would be 1 tap)
        return frame
    return cv2.GaussianBlur(frame, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def _warp(frame: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``frame`` through the 2x3 affine ``m``, same size, black where the frame comes into view."""
    return cv2.warpAffine(frame, m, (frame.shape[1], frame.shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def reframe_copy_seed(seed: int, k: int) -> int:
    """The generator seed of re-framed copy ``k`` of the fit normals of a run seeded ``seed`` (``medgru train
    --reframe-copies``, the CV twins of ``medgru evaluate --cv``, ``recipe_selection.py --reframe``)."""
    return seed * 1000 + 500 + k


def reframe_sequence(seq: FrameSequence, rng: np.random.Generator, params: ReframeParams = ReframeParams()
                     ) -> FrameSequence:
    """``seq`` re-framed: one random transform for all its frames (a series shares its framing).

    For a single frame it draws the same numbers as :func:`reframe`, so the same generator gives the same
    image either way. The copy keeps the modality, body part and bit depth; it drops the source's UIDs."""
    m = reframe_matrix(seq.frames.shape[1:], rng, params)
    sigma = blur_sigma(seq.frames.shape[1:], rng, params)
    frames = np.stack([_blur(_warp(f, m), sigma) for f in seq.frames]).astype(np.float32)
    return replace(seq, frames=np.clip(frames, 0.0, 1.0), series_uid="", frame_refs=())
