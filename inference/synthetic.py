"""Synthetic anomalies made from normal frames (outlier exposure and the HPO objective).

No real anomaly is ever used in unsupervised mode: these local perturbations stand in for "something
that is not normal anatomy". They are applied to the windowed frame before CLAHE, as a real lesion would
be. Each returns the perturbed frame and a mask of the changed region (used by the tests and Grad-CAM
checks).

Kinds:

* ``opacity``: a soft-edged ellipse blended towards a brighter, smoothed version of itself (a focal
  opacity / consolidation-like haze or a mass).
* ``lucency``: the same, but darker (a focal lucency or cavity).
* ``smooth``: a region whose fine texture is removed by a strong Gaussian blur.
* ``cutpaste``: a rectangle copied from elsewhere in the frame (or from a donor frame), rescaled and
  rotated, with a small intensity jitter (Li et al., CutPaste, 2021).
* ``noise``: band-limited texture noise added inside a soft ellipse.
* ``diffuse``: a large soft region (40-80 % of the frame) hazed: blurred and raised in intensity, with
  lower local contrast (a diffuse opacity / oedema-like change rather than a focal one).
"""

from __future__ import annotations

import cv2
import numpy as np

KINDS = ("opacity", "lucency", "smooth", "cutpaste", "noise", "diffuse")
#: bump when the generator changes (feature caches key on it)
SYNTHETIC_VERSION = 2


def _soft_ellipse(h: int, w: int, rng: np.random.Generator, min_frac: float, max_frac: float,
                  margin: float = 0.15) -> np.ndarray:
    cy = rng.uniform(margin, 1 - margin) * h
    cx = rng.uniform(margin, 1 - margin) * w
    ry = rng.uniform(min_frac, max_frac) * h / 2
    rx = rng.uniform(min_frac, max_frac) * w / 2
    ang = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(ang) + dy * np.sin(ang)) / rx
    v = (-dx * np.sin(ang) + dy * np.cos(ang)) / ry
    r = np.sqrt(u * u + v * v)
    edge = rng.uniform(0.15, 0.5)
    return np.clip((1.0 - r) / edge, 0.0, 1.0).astype(np.float32)


def synthesize(frame: np.ndarray, rng: np.random.Generator, kind: str | None = None,
               donor: np.ndarray | None = None, min_frac: float = 0.12, max_frac: float = 0.40
               ) -> tuple[np.ndarray, np.ndarray, str]:
    """A synthetic anomaly in one float32 ``(H, W)`` frame in [0, 1]; returns ``(frame, mask, kind)``."""
    f = np.asarray(frame, dtype=np.float32)
    h, w = f.shape
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    if kind in ("opacity", "lucency", "smooth", "noise", "diffuse"):
        if kind == "diffuse":
            m = _soft_ellipse(h, w, rng, 0.4, 0.8, margin=0.3)
        else:
            m = _soft_ellipse(h, w, rng, min_frac, max_frac)
        if kind == "diffuse":
            sigma = rng.uniform(2.0, 6.0) * h / 224
            blurred = cv2.GaussianBlur(f, (0, 0), sigma)
            target = np.clip(blurred + rng.uniform(0.08, 0.25), 0, 1)
            a = rng.uniform(0.4, 0.8)
            out = f * (1 - a * m) + target * (a * m)
        elif kind == "opacity":
            sigma = rng.uniform(1.5, 5.0) * h / 224
            target = np.clip(cv2.GaussianBlur(f, (0, 0), sigma) + rng.uniform(0.12, 0.35), 0, 1)
            a = rng.uniform(0.5, 0.9)
            out = f * (1 - a * m) + target * (a * m)
        elif kind == "lucency":
            sigma = rng.uniform(1.0, 4.0) * h / 224
            target = np.clip(cv2.GaussianBlur(f, (0, 0), sigma) - rng.uniform(0.12, 0.35), 0, 1)
            a = rng.uniform(0.5, 0.9)
            out = f * (1 - a * m) + target * (a * m)
        elif kind == "smooth":
            sigma = rng.uniform(3.0, 8.0) * h / 224
            out = f * (1 - m) + cv2.GaussianBlur(f, (0, 0), sigma) * m
        else:  # noise
            n = rng.normal(0, 1, (h, w)).astype(np.float32)
            n = cv2.GaussianBlur(n, (0, 0), rng.uniform(0.7, 2.0) * h / 224)
            n /= n.std() + 1e-6
            out = f + rng.uniform(0.05, 0.15) * n * m
        mask = m
    elif kind == "cutpaste":
        src = f if donor is None else np.asarray(donor, dtype=np.float32)
        ph = int(rng.uniform(min_frac, max_frac) * h)
        pw = int(np.clip(ph * rng.uniform(0.5, 2.0), 8, w * max_frac))
        ph = max(ph, 8)
        sy, sx = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
        patch = src[sy:sy + ph, sx:sx + pw].copy()
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        angle = rng.uniform(-45, 45)
        rot = cv2.getRotationMatrix2D((pw / 2, ph / 2), angle, 1.0)
        patch = cv2.warpAffine(np.ascontiguousarray(patch), rot, (pw, ph), borderMode=cv2.BORDER_REFLECT)
        patch = np.clip(patch * rng.uniform(0.85, 1.15) + rng.uniform(-0.08, 0.08), 0, 1)
        m = 0.15
        ty = int(rng.integers(int(m * h), max(int(m * h) + 1, int((1 - m) * h) - ph)))
        tx = int(rng.integers(int(m * w), max(int(m * w) + 1, int((1 - m) * w) - pw)))
        out = f.copy()
        out[ty:ty + ph, tx:tx + pw] = patch
        mask = np.zeros_like(f)
        mask[ty:ty + ph, tx:tx + pw] = 1.0
    else:
        raise ValueError(f"unknown synthetic anomaly kind {kind!r}; choose one of {KINDS}")
    return np.clip(out, 0.0, 1.0).astype(np.float32), mask.astype(np.float32), kind
