"""``knn-effnet``: the strong, simple baseline: k-nearest-neighbour distance on frozen ImageNet features.

Training keeps a memory of the normals' features from the frozen EfficientNet-Lite0 of
:mod:`inference.backbone` (no learned weights at all):

* **score**: each frame is resized to ``image_size``, its multi-scale feature map is average-pooled to
  one vector, standardised with the training normals' per-channel mean and std, and scored by the mean
  Euclidean distance (divided by sqrt(dim)) to its ``k`` nearest training normals. A sequence scores the
  maximum over its frames.
* **heat map**: patch-wise: each cell of the stride-16 feature map is scored by its distance to the
  nearest of a random subsample of training patches (``patch_bank_size``), mapped to ``[0, 1]`` with the
  validation normals' patch-distance median and 99th percentile, and resized to the frame.
* **threshold**: split-conformal on held-out normals: the ``ceil((n + 1)(1 - alpha))``-th smallest
  validation score, so a new normal exceeds it with probability at most ``alpha`` (5 %). Without a
  ``validation`` set, ``holdout_fraction`` of the normals is held out (and not memorised).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from inference.api import (Detection, Detector, FrameSequence, ModelCard,
                           highest_judged_frames, register_detector, split_calibration_normals)

WEIGHTS_FILE = "knn_effnet.npz"


@register_detector("knn-effnet")
class KnnEffNetDetector(Detector):
    """k-NN on pooled frozen EfficientNet-Lite0 features (see the module docstring)."""

    SMALL_PARAMS = {"image_size": 64, "k": 1, "patch_bank_size": 256, "batch_size": 8}
    MODEL_FILES = (WEIGHTS_FILE,)

    def __init__(self, image_size: int = 224, k: int = 5, patch_bank_size: int = 16384, alpha: float = 0.05,
                 holdout_fraction: float = 0.2, batch_size: int = 32, name: str = "knn-effnet",
                 version: str = "1.0.0"):
        if image_size < 32 or image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 and >= 32, got {image_size}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        self.image_size = int(image_size)
        self.k = int(k)
        self.patch_bank_size = int(patch_bank_size)
        self.alpha = float(alpha)
        self.holdout_fraction = float(holdout_fraction)
        self.batch_size = int(batch_size)
        self.name = name
        self.version = version
        self.device = "cpu"
        # trained state
        self._bank: np.ndarray | None = None  # (N, D) standardised pooled features, float32
        self._mu: np.ndarray | None = None
        self._sd: np.ndarray | None = None
        self._patches: np.ndarray | None = None  # (P, C) patch features, float32
        self._threshold: float | None = None
        self._heat_lo = 0.0
        self._heat_hi = 1.0

    # ------------------------------------------------------------------------------------ params
    def get_params(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size, "k": self.k, "patch_bank_size": self.patch_bank_size,
            "alpha": self.alpha, "holdout_fraction": self.holdout_fraction, "batch_size": self.batch_size,
            "name": self.name, "version": self.version,
        }

    def to(self, device: str) -> "KnnEffNetDetector":
        """Run the backbone (and the distance computations) on ``device`` (``cpu`` or ``cuda``)."""
        self.device = str(device)
        return self

    @property
    def threshold(self) -> float:
        if self._threshold is None:
            raise RuntimeError(f"{self.name}: not trained (no threshold)")
        return self._threshold

    # ------------------------------------------------------------------------------------ features
    def _prep(self, frames: np.ndarray):
        """``(B, H, W)`` float frames in [0, 1] -> torch ``(B, 1, S, S)``."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))[:, None].to(self.device)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True).clamp_(0.0, 1.0)
        return x

    def _features(self, frames: np.ndarray, *, patches: bool):
        """Pooled vectors ``(B, C)`` and, if asked, feature maps ``(B, C, h, w)`` (torch, on device)."""
        import torch

        from inference.backbone import extract_feature_maps, load_backbone

        backbone = load_backbone(self.device)
        pooled, maps = [], []
        with torch.no_grad():
            for i in range(0, frames.shape[0], self.batch_size):
                fm = extract_feature_maps(self._prep(frames[i:i + self.batch_size]), backbone,
                                          batch_size=self.batch_size)
                pooled.append(fm.mean(dim=(2, 3)))
                if patches:
                    maps.append(fm)
        return torch.cat(pooled), (torch.cat(maps) if patches else None)

    @staticmethod
    def _all_frames(sequences: Sequence[FrameSequence]) -> tuple[np.ndarray | list, np.ndarray]:
        """Frames of all sequences (a list when sizes differ) and each frame's sequence index."""
        owners = np.concatenate([np.full(s.length, i) for i, s in enumerate(sequences)]) if sequences else \
            np.zeros(0, dtype=np.int64)
        shapes = {s.frames.shape[1:] for s in sequences}
        if len(shapes) == 1:
            return np.concatenate([s.frames for s in sequences]), owners
        return [f for s in sequences for f in s.frames], owners

    def _pooled_of(self, sequences: Sequence[FrameSequence], *, patches: bool = False):
        import torch

        frames, owners = self._all_frames(sequences)
        if isinstance(frames, np.ndarray):
            return (*self._features(frames, patches=patches), owners)
        # mixed frame sizes: one frame at a time (each is resized to image_size anyway)
        outs = [self._features(f[None], patches=patches) for f in frames]
        pooled = torch.cat([o[0] for o in outs])
        maps = torch.cat([o[1] for o in outs]) if patches else None
        return pooled, maps, owners

    def _knn_scores(self, pooled) -> np.ndarray:
        """Mean distance to the k nearest memorised normals, per frame."""
        import torch

        if self._bank is None:
            raise RuntimeError(f"{self.name}: not trained")
        mu = torch.from_numpy(self._mu).to(pooled.device)
        sd = torch.from_numpy(self._sd).to(pooled.device)
        z = (pooled.float() - mu) / sd
        bank = torch.from_numpy(self._bank).to(pooled.device)
        d = torch.cdist(z, bank)  # (B, N)
        k = min(self.k, bank.shape[0])
        near = torch.topk(d, k, dim=1, largest=False).values.mean(dim=1)
        return (near / math.sqrt(bank.shape[1])).double().cpu().numpy()

    def _patch_distances(self, maps) -> np.ndarray:
        """Distance of each feature-map cell to its nearest memorised patch: ``(B, h, w)``."""
        import torch

        bank = torch.from_numpy(self._patches).to(maps.device)
        b, c, h, w = maps.shape
        flat = maps.permute(0, 2, 3, 1).reshape(-1, c).float()
        out = []
        for i in range(0, flat.shape[0], 4096):
            out.append(torch.cdist(flat[i:i + 4096], bank).min(dim=1).values)
        d = torch.cat(out) / math.sqrt(c)
        return d.reshape(b, h, w).cpu().numpy()

    # ------------------------------------------------------------------------------------ training
    def fit(self, normals: Sequence[FrameSequence], *, validation: Sequence[FrameSequence] = (),
            seed: int = 0) -> None:
        import torch

        rng = np.random.default_rng(seed)
        normals, validation = split_calibration_normals(self.name, normals, validation, self.holdout_fraction, rng)
        pooled, maps, _ = self._pooled_of(normals, patches=True)
        pooled = pooled.float()
        self._mu = pooled.mean(dim=0).cpu().numpy().astype(np.float32)
        self._sd = (pooled.std(dim=0, unbiased=False) + 1e-3 * pooled.std(dim=0, unbiased=False).mean() + 1e-6
                    ).cpu().numpy().astype(np.float32)
        self._bank = ((pooled.cpu().numpy() - self._mu) / self._sd).astype(np.float32)
        c = maps.shape[1]
        flat = maps.permute(0, 2, 3, 1).reshape(-1, c)
        take = rng.choice(flat.shape[0], size=min(self.patch_bank_size, flat.shape[0]), replace=False)
        # stored as float16: round now so a saved and reloaded model gives the same heat maps
        self._patches = flat[torch.from_numpy(np.sort(take)).to(flat.device)].cpu().numpy().astype(np.float16
                                                                                        ).astype(np.float32)
        del maps, flat

        vpooled, vmaps, _ = self._pooled_of(validation, patches=True)
        # each validation frame alone, as a series' frames are judged (Detector.series_threshold)
        self.calibrate(self._knn_scores(vpooled), self.alpha)
        vd = self._patch_distances(vmaps).ravel()
        lo, hi = np.percentile(vd, [50.0, 99.0])
        self._heat_lo = float(lo)
        self._heat_hi = float(max(hi, lo + 1e-6))

    # ------------------------------------------------------------------------------------ scoring
    def score_batch(self, sequences: Sequence[FrameSequence]) -> np.ndarray:
        sequences = list(sequences)
        if not sequences:
            return np.zeros(0, dtype=np.float64)
        pooled, _, owners = self._pooled_of(sequences, patches=False)
        return highest_judged_frames(self._knn_scores(pooled), owners, sequences).astype(np.float64)

    def detect(self, sequence: FrameSequence, *, explain: bool = True) -> Detection:
        pooled, maps, _ = self._pooled_of([sequence], patches=explain)
        frame_scores = self._knn_scores(pooled)
        if not explain:
            return self.frame_detection(sequence, frame_scores, None)
        pd = self._patch_distances(maps)
        return self.frame_detection(sequence, frame_scores, pd, (self._heat_lo, self._heat_hi),
                                    {"max_patch_distance": float(pd.max())})

    # ------------------------------------------------------------------------------------ persistence
    def save(self, model_dir: Path) -> list[str]:
        if self._bank is None or self._threshold is None:
            raise RuntimeError(f"{self.name}: not trained, nothing to save")
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        with open(model_dir / WEIGHTS_FILE, "wb") as fh:
            np.savez(fh, bank=self._bank, mu=self._mu, sd=self._sd, patches=self._patches.astype(np.float16),
                     threshold=np.float64(self._threshold), heat_lo=np.float64(self._heat_lo),
                     heat_hi=np.float64(self._heat_hi))
        return [WEIGHTS_FILE]

    @classmethod
    def load(cls, model_dir: Path, card: ModelCard) -> "KnnEffNetDetector":
        det = cls(**dict(card.params))
        path = Path(model_dir) / WEIGHTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"model {card.name}: {WEIGHTS_FILE} missing from {model_dir}")
        with np.load(path, allow_pickle=False) as z:
            det._bank = z["bank"].astype(np.float32)
            det._mu = z["mu"].astype(np.float32)
            det._sd = z["sd"].astype(np.float32)
            det._patches = z["patches"].astype(np.float32)
            det._threshold = float(z["threshold"])
            det._heat_lo = float(z["heat_lo"])
            det._heat_hi = float(z["heat_hi"])
        det.card = card
        return det
