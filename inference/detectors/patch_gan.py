"""``patch-gan``: masked Patch-GAN with patch ranking (Chen, Yang et al., AAAI 2025, a seed paper).

Normal-only training of two small networks on frames resized to ``image_size`` (greyscale, ``[0, 1]``):

* **mask reconstructor** ``R``: a U-Net (three down-samplings, ``base_channels`` wide at full resolution)
  that receives a frame whose square blocks of ``patch_size`` pixels were masked at random
  (``mask_ratio`` of the blocks, drawn per image; a mask channel says which) and rebuilds the whole
  frame. Loss: L1 over the frame plus L1 over the masked blocks, plus ``adv_weight`` times the
  adversarial loss (0.01, the ratio of pix2pix's 100 : 1; the paper's weighting, "0.2", is ambiguous
  about which term it scales).
* **PatchGAN discriminator** ``D``: ``log2(patch_size)`` strided 4x4 convolutions give one real/fake
  logit per ``patch_size`` block (a grid of ``image_size / patch_size`` cells). As the paper describes,
  it compares the original with a candidate patch by patch: it reads the pair (original, candidate), the
  real pair being (x, x) and the fake one (x, R(z)), so its "fake" evidence is a learned per-patch
  discrepancy between a frame and its reconstruction.

**Score** of one frame (deterministic, no random masks): the block grid is split into
``mask_phases ** 2`` fixed patterns (block (i, j) belongs to pattern ``(i mod p, j mod p)``), so every
block is masked in exactly one pattern, its neighbours visible. For each pattern the masked frame is
reconstructed; each patch gets

* its reconstruction error: the mean absolute error over its pixels, from the pattern that masked it
  (in-painting error: an unusual patch cannot be predicted from its normal-looking context);
* its discriminator evidence: ``softplus(-logit)`` (``-log D``) of the pair (x, R(z)) at its cell, from
  the same pattern.

Each of the two is standardised by its mean and standard deviation over all patches of (up to 256) fit
normals, and the patch score is their weighted mean (``disc_weight`` for the discriminator's, 1 for the
reconstruction's). **Patch ranking**: the patches are sorted by score and the top ``top_k`` averaged with
the paper's rank weights (1.1 for the most anomalous patch, falling linearly to 1.0 for the k-th); that
is the frame's score. A sequence scores its highest judged frame, each frame scored alone.

**Heat map**: the patch-score grid, mapped to ``[0, 1]`` with the validation normals' patch-score median
and 99th percentile, resized to the frame.

**Threshold**: split-conformal on held-out normals (:meth:`Detector.calibrate`), each frame scored alone;
without a ``validation`` set, ``holdout_fraction`` of the normals is held out (and not trained on).
Random masks, batch order, flips and initial weights come from ``seed``: the same data, seed and torch
thread count give the same model.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.api import (Detection, Detector, FrameSequence, ModelCard, highest_judged_frames,
                           register_detector, split_calibration_normals)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "patch_gan.npz"
#: fit normals (at most) whose patch values standardise the two score terms
STATS_IMAGES = 256


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    groups = 4 if cout % 4 == 0 else 1
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation),
                         nn.GroupNorm(groups, cout), nn.LeakyReLU(0.2))


class MaskReconstructor(nn.Module):
    """A small U-Net: (masked frame, mask) -> frame, in ``[0, 1]``."""

    def __init__(self, c: int):
        super().__init__()
        self.e0 = nn.Sequential(_block(2, c), _block(c, c))
        self.e1 = nn.Sequential(_block(c, 2 * c, 2), _block(2 * c, 2 * c))
        self.e2 = nn.Sequential(_block(2 * c, 4 * c, 2), _block(4 * c, 4 * c))
        # the bottleneck sees far: dilated convolutions widen the context a masked block is filled from
        self.e3 = nn.Sequential(_block(4 * c, 4 * c, 2), _block(4 * c, 4 * c, dilation=2),
                                _block(4 * c, 4 * c, dilation=4))
        self.d2 = _block(8 * c, 4 * c)
        self.d1 = _block(6 * c, 2 * c)
        self.d0 = _block(3 * c, c)
        self.out = nn.Conv2d(c, 1, 1)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="nearest")

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x0 = self.e0(torch.cat([z, mask], 1))
        x1 = self.e1(x0)
        x2 = self.e2(x1)
        x3 = self.e3(x2)
        y = self.d2(torch.cat([self._up(x3, x2), x2], 1))
        y = self.d1(torch.cat([self._up(y, x1), x1], 1))
        y = self.d0(torch.cat([self._up(y, x0), x0], 1))
        return torch.sigmoid(self.out(y))


class PatchDiscriminator(nn.Module):
    """PatchGAN on the pair (original, candidate): one real/fake logit per ``2 ** depth`` pixel block."""

    def __init__(self, c: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 2
        for i in range(depth):
            cout = c * min(2 ** i, 4)
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, y], 1))[:, 0]


@register_detector("patch-gan")
class PatchGANDetector(Detector):
    """Masked Patch-GAN with patch ranking (see the module docstring)."""

    SMALL_PARAMS = {"image_size": 32, "patch_size": 8, "base_channels": 8, "epochs": 4, "batch_size": 8,
                    "top_k": 2}
    MODEL_FILES = (WEIGHTS_FILE,)

    def __init__(self, image_size: int = 128, patch_size: int = 16, base_channels: int = 16, epochs: int = 20,
                 batch_size: int = 16, lr: float = 1e-3, mask_ratio: float = 0.25, mask_phases: int = 2,
                 adv_weight: float = 0.01, disc_weight: float = 1.0, top_k: int = 4, alpha: float = 0.05,
                 holdout_fraction: float = 0.2, flip: bool = True, name: str = "patch-gan",
                 version: str = "1.0.0"):
        if patch_size < 4 or patch_size & (patch_size - 1):
            raise ValueError(f"patch_size must be a power of 2 and >= 4, got {patch_size}")
        if image_size < 2 * patch_size or image_size % patch_size or image_size % 8:
            raise ValueError(f"image_size must be a multiple of patch_size ({patch_size}) and of 8, and at least "
                             f"twice patch_size, got {image_size}")
        if (image_size // patch_size) < mask_phases or mask_phases < 1:
            raise ValueError(f"mask_phases must lie in [1, {image_size // patch_size}], got {mask_phases}")
        grid = image_size // patch_size
        if not 1 <= top_k <= grid * grid:
            raise ValueError(f"top_k must lie in [1, {grid * grid}] patches, got {top_k}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        if epochs < 1 or batch_size < 1 or base_channels < 1:
            raise ValueError("epochs, batch_size and base_channels must be >= 1")
        if disc_weight < 0 or adv_weight < 0:
            raise ValueError("disc_weight and adv_weight must be >= 0")
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.base_channels = int(base_channels)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.mask_ratio = float(mask_ratio)
        self.mask_phases = int(mask_phases)
        self.adv_weight = float(adv_weight)
        self.disc_weight = float(disc_weight)
        self.top_k = int(top_k)
        self.alpha = float(alpha)
        self.holdout_fraction = float(holdout_fraction)
        self.flip = bool(flip)
        self.name = name
        self.version = version
        self.device = "cpu"
        # trained state
        self._gen: MaskReconstructor | None = None
        self._disc: PatchDiscriminator | None = None
        self._threshold: float | None = None
        self._stats = np.array([0.0, 1.0, 0.0, 1.0])  # rec mean, rec sd, disc mean, disc sd
        self._heat_lo = 0.0
        self._heat_hi = 1.0
        self.history: list[dict[str, float]] = []  # per-epoch mean losses of the last fit

    # ------------------------------------------------------------------------------------ params
    def get_params(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size, "patch_size": self.patch_size, "base_channels": self.base_channels,
            "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "mask_ratio": self.mask_ratio,
            "mask_phases": self.mask_phases, "adv_weight": self.adv_weight, "disc_weight": self.disc_weight,
            "top_k": self.top_k, "alpha": self.alpha, "holdout_fraction": self.holdout_fraction,
            "flip": self.flip, "name": self.name, "version": self.version,
        }

    def to(self, device: str) -> "PatchGANDetector":
        """Run the networks on ``device`` (``cpu`` or ``cuda``)."""
        self.device = str(device)
        for net in (self._gen, self._disc):
            if net is not None:
                net.to(self.device)
        return self

    @property
    def threshold(self) -> float:
        if self._threshold is None:
            raise RuntimeError(f"{self.name}: not trained (no threshold)")
        return self._threshold

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def _new_networks(self) -> tuple[MaskReconstructor, PatchDiscriminator]:
        depth = int(round(math.log2(self.patch_size)))
        return MaskReconstructor(self.base_channels), PatchDiscriminator(self.base_channels, depth)

    # ------------------------------------------------------------------------------------ frames
    def resize_frames(self, frames: np.ndarray) -> np.ndarray:
        """``(B, H, W)`` frames in [0, 1] -> ``(B, S, S)`` float32, as the networks read them."""
        x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))[:, None]
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        return x[:, 0].numpy()

    def _frames_of(self, sequences: Sequence[FrameSequence]) -> tuple[np.ndarray, np.ndarray]:
        """All frames resized, ``(N, S, S)``, and each frame's sequence index."""
        if not sequences:
            return np.zeros((0, self.image_size, self.image_size), np.float32), np.zeros(0, np.int64)
        owners = np.concatenate([np.full(s.length, i) for i, s in enumerate(sequences)])
        return np.concatenate([self.resize_frames(s.frames) for s in sequences]), owners

    def _block_mask(self, blocks: torch.Tensor) -> torch.Tensor:
        """``(B, g, g)`` block mask (1 = masked) -> ``(B, 1, S, S)`` pixel mask."""
        p = self.patch_size
        return blocks.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)[:, None].float()

    def _patterns(self) -> torch.Tensor:
        """The fixed scoring patterns ``(P, g, g)``: block (i, j) is masked in pattern (i mod p, j mod p)."""
        p, g = self.mask_phases, self.grid
        i = torch.arange(g)
        out = [((i[:, None] % p == a) & (i[None, :] % p == b)) for a in range(p) for b in range(p)]
        return torch.stack(out).float()

    # ------------------------------------------------------------------------------------ training
    def fit(self, normals: Sequence[FrameSequence], *, validation: Sequence[FrameSequence] = (),
            seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        normals, validation = split_calibration_normals(self.name, normals, validation, self.holdout_fraction, rng)
        train, _ = self._frames_of(normals)
        self._train(train, seed)
        # the two score terms standardised on (a seeded subsample of) the fit normals' patches
        take = np.sort(rng.choice(len(train), size=min(STATS_IMAGES, len(train)), replace=False))
        rec, disc = self._patch_terms(train[take])
        self._stats = np.array([rec.mean(), rec.std() + 1e-8, disc.mean(), disc.std() + 1e-8], dtype=np.float64)
        # each validation frame alone, as a series' frames are judged (Detector.series_threshold)
        val, _ = self._frames_of(validation)
        patch = self._patch_scores(val)
        self.calibrate(self._rank(patch), self.alpha)
        lo, hi = np.percentile(patch.ravel(), [50.0, 99.0])
        self._heat_lo = float(lo)
        self._heat_hi = float(max(hi, lo + 1e-6))

    def _train(self, frames: np.ndarray, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gen, disc = self._new_networks()
        gen.to(self.device).train()
        disc.to(self.device).train()
        g = torch.Generator().manual_seed(seed)
        opt_g = torch.optim.Adam(gen.parameters(), lr=self.lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=self.lr, betas=(0.5, 0.999))
        data = torch.from_numpy(frames)[:, None]
        n = data.shape[0]
        self.history = []
        for epoch in range(self.epochs):
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=g)
            sums = np.zeros(3)
            for i in range(0, n, self.batch_size):
                idx = perm[i:i + self.batch_size]
                x = data[idx]
                if self.flip:
                    flipped = torch.rand(len(idx), generator=g) < 0.5
                    x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
                blocks = torch.rand(len(idx), self.grid, self.grid, generator=g) < self.mask_ratio
                m = self._block_mask(blocks)
                x, m = x.to(self.device), m.to(self.device)
                r = gen(x * (1 - m), m)
                # discriminator: (x, x) real, (x, R(z)) fake, per patch
                d_real = disc(x, x)
                d_fake = disc(x, r.detach())
                loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                          + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                # reconstructor: L1 over the frame and over the holes, plus the adversarial term
                err = (r - x).abs()
                loss_rec = err.mean() + (err * m).sum() / m.sum().clamp_min(1.0)
                d_gen = disc(x, r)
                loss_adv = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
                loss_g = loss_rec + self.adv_weight * loss_adv
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                sums += np.array([loss_rec.item(), loss_adv.item(), loss_d.item()]) * len(idx)
            self.history.append(dict(zip(("rec", "adv", "disc"), (sums / n).tolist())))
            log.info("%s epoch %d/%d: %s (%.1f s)", self.name, epoch + 1, self.epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in self.history[-1].items()), time.perf_counter() - t0)
        self._gen, self._disc = gen.eval(), disc.eval()

    # ------------------------------------------------------------------------------------ scoring
    def _patch_terms(self, frames: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Per patch of each frame ``(N, g, g)``: the in-painting error and the discriminator's evidence
        ``-log D``, each from the fixed pattern that masked the patch."""
        if self._gen is None or self._disc is None:
            raise RuntimeError(f"{self.name}: not trained")
        pats = self._patterns()
        p = self.patch_size
        rec_out, disc_out = [], []
        with torch.no_grad():
            for i in range(0, frames.shape[0], batch):
                x = torch.from_numpy(np.ascontiguousarray(frames[i:i + batch]))[:, None].to(self.device)
                b = x.shape[0]
                rec = torch.zeros(b, self.grid, self.grid, device=self.device)
                evid = torch.zeros_like(rec)
                for pat in pats:
                    m = self._block_mask(pat[None]).to(self.device).expand(b, -1, -1, -1)
                    r = self._gen(x * (1 - m), m)
                    cell_err = F.avg_pool2d((r - x).abs(), p)[:, 0]
                    cell_evid = F.softplus(-self._disc(x, r))
                    w = pat.to(self.device)[None]
                    rec += w * cell_err
                    evid += w * cell_evid
                rec_out.append(rec.double().cpu().numpy())
                disc_out.append(evid.double().cpu().numpy())
        return np.concatenate(rec_out), np.concatenate(disc_out)

    def _patch_scores(self, frames: np.ndarray) -> np.ndarray:
        """Standardised, combined patch scores ``(N, g, g)``."""
        if frames.shape[0] == 0:
            return np.zeros((0, self.grid, self.grid))
        rec, disc = self._patch_terms(frames)
        mr, sr, md, sd = self._stats
        return ((rec - mr) / sr + self.disc_weight * (disc - md) / sd) / (1.0 + self.disc_weight)

    def _rank(self, patch: np.ndarray) -> np.ndarray:
        """Patch ranking: the rank-weighted mean of each frame's ``top_k`` patch scores (weights 1.1 for
        the highest, falling linearly to 1.0 for the k-th)."""
        flat = -np.sort(-patch.reshape(patch.shape[0], -1), axis=1)[:, :self.top_k]
        w = np.linspace(1.1, 1.0, self.top_k) if self.top_k > 1 else np.array([1.1])
        return (flat @ w) / w.sum()

    def score_batch(self, sequences: Sequence[FrameSequence]) -> np.ndarray:
        sequences = list(sequences)
        if not sequences:
            return np.zeros(0, dtype=np.float64)
        frames, owners = self._frames_of(sequences)
        return highest_judged_frames(self._rank(self._patch_scores(frames)), owners, sequences).astype(np.float64)

    def detect(self, sequence: FrameSequence, *, explain: bool = True) -> Detection:
        frames, _ = self._frames_of([sequence])
        patch = self._patch_scores(frames)
        frame_scores = self._rank(patch)
        if not explain:
            return self.frame_detection(sequence, frame_scores, None)
        return self.frame_detection(sequence, frame_scores, patch, (self._heat_lo, self._heat_hi),
                                    {"max_patch_score": float(patch.max())})

    # ------------------------------------------------------------------------------------ persistence
    def save(self, model_dir: Path) -> list[str]:
        if self._gen is None or self._disc is None or self._threshold is None:
            raise RuntimeError(f"{self.name}: not trained, nothing to save")
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        arrays = {f"gen.{k}": v.detach().cpu().numpy() for k, v in self._gen.state_dict().items()}
        arrays.update({f"disc.{k}": v.detach().cpu().numpy() for k, v in self._disc.state_dict().items()})
        with open(model_dir / WEIGHTS_FILE, "wb") as fh:
            np.savez(fh, **arrays, stats=self._stats, threshold=np.float64(self._threshold),
                     heat_lo=np.float64(self._heat_lo), heat_hi=np.float64(self._heat_hi))
        return [WEIGHTS_FILE]

    @classmethod
    def load(cls, model_dir: Path, card: ModelCard) -> "PatchGANDetector":
        det = cls(**dict(card.params))
        path = Path(model_dir) / WEIGHTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"model {card.name}: {WEIGHTS_FILE} missing from {model_dir}")
        gen, disc = det._new_networks()
        with np.load(path, allow_pickle=False) as z:
            for prefix, net in (("gen.", gen), ("disc.", disc)):
                state = {k[len(prefix):]: torch.from_numpy(z[k]) for k in z.files if k.startswith(prefix)}
                net.load_state_dict(state, strict=True)
            det._stats = z["stats"].astype(np.float64)
            det._threshold = float(z["threshold"])
            det._heat_lo = float(z["heat_lo"])
            det._heat_hi = float(z["heat_hi"])
        det._gen, det._disc = gen.eval(), disc.eval()
        det.card = card
        return det
