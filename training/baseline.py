"""Training of the detectors beside MedGRU-SVC: the ``knn-effnet`` baseline and ``patch-gan``
(``medgru train --detector knn-effnet`` / ``patch-gan``).

Only rows of the training split whose label is normal are used; anomalies are never read. A grouped
share of those normals (``--knn-calibration-fraction``, by the manifest's ``group`` column where present,
so one patient's images stay on one side) is held out to calibrate the split-conformal threshold at
``--target-fpr``; the rest is memorised (k-NN) or trained on (patch-gan).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from inference.api import NOT_FOR_DIAGNOSTIC_USE, ModelCard, Scope, get_detector_class, save_model, sha256_file

log = logging.getLogger(__name__)


def grouped_holdout(rows: Sequence, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (fit, calibration): about ``fraction`` of the groups (or rows) go to calibration."""
    rng = np.random.default_rng(seed)
    groups = [r.group or f"__row{i}" for i, r in enumerate(rows)]
    uniq = sorted(set(groups))
    rng.shuffle(uniq)
    cal_groups = set(uniq[: max(1, int(round(fraction * len(uniq))))])
    cal = [i for i, g in enumerate(groups) if g in cal_groups]
    fit = [i for i, g in enumerate(groups) if g not in cal_groups]
    return fit, cal


def train_knn(normals: Sequence, out: Path, *, name: str, version: str, modalities: Sequence[str],
              body_parts: Sequence[str], source: str, calibration_fraction: float = 0.2, seed: int = 0,
              params: dict[str, Any] | None = None, workers: int = 2) -> ModelCard:
    """Fit ``knn-effnet`` on ``normals`` (manifest rows), save it with its card into ``out``."""
    from inference.backbone import backbone_info

    bb = backbone_info()
    return train_holdout_detector(
        "knn-effnet", normals, out, name=name, version=version, modalities=modalities, body_parts=body_parts,
        source=source, calibration_fraction=calibration_fraction, seed=seed, params=params, workers=workers,
        description="k-NN distance on pooled frozen EfficientNet-Lite0 (ImageNet) features; patch-distance "
                    "heat maps; split-conformal threshold on held-out normals.",
        limitations=("Memorises training-normal features; sensitive to acquisition and style shift "
                     "(the threshold calibrated on training-split normals may not hold on other data).",
                     f"Backbone: {bb['name']} ({bb['weights_package']}); weights not in this folder.",
                     NOT_FOR_DIAGNOSTIC_USE),
        fitted="memorised")


def train_patch_gan(normals: Sequence, out: Path, *, name: str, version: str, modalities: Sequence[str],
                    body_parts: Sequence[str], source: str, calibration_fraction: float = 0.2, seed: int = 0,
                    params: dict[str, Any] | None = None, workers: int = 2,
                    command_args: dict[str, Any] | None = None) -> ModelCard:
    """Fit ``patch-gan`` on ``normals`` (manifest rows), save it with its card and a ``training.json`` (the
    per-epoch losses, the time, the command's arguments and the software) into ``out``."""
    return train_holdout_detector(
        "patch-gan", normals, out, name=name, version=version, modalities=modalities, body_parts=body_parts,
        source=source, calibration_fraction=calibration_fraction, seed=seed, params=params, workers=workers,
        description="Masked Patch-GAN with patch ranking (Chen, Yang et al. 2025): a small U-Net rebuilds "
                    "frames with masked blocks (L1 + adversarial loss), a PatchGAN discriminator judges "
                    "(original, reconstruction) patch by patch; score = rank-weighted mean of the top-k "
                    "patches' standardised in-painting error and discriminator evidence; patch-score heat "
                    "maps; split-conformal threshold on held-out normals.",
        limitations=("Trained from scratch on one data set's normals, at low resolution; sensitive to "
                     "acquisition and style shift (the threshold calibrated on training-split normals may not "
                     "hold on other data).",
                     "Heat maps are a coarse patch grid, not a segmentation.",
                     NOT_FOR_DIAGNOSTIC_USE),
        fitted="trained on", command_args=command_args)


def train_holdout_detector(detector: str, normals: Sequence, out: Path, *, name: str, version: str,
                           modalities: Sequence[str], body_parts: Sequence[str], source: str, description: str,
                           limitations: Sequence[str], fitted: str, calibration_fraction: float = 0.2,
                           seed: int = 0, params: dict[str, Any] | None = None, workers: int = 2,
                           command_args: dict[str, Any] | None = None) -> ModelCard:
    """Fit the registered ``detector`` on ``normals`` (manifest rows) less a grouped held-out share that
    calibrates its threshold, and save it with its card into ``out``. With ``command_args``, also a
    ``training.json`` (listed in the card) with them, the fit's time, its ``history`` if it keeps one, and
    the software."""
    from training.manifest import load_sequences

    if len(normals) < 2:
        raise ValueError(f"only {len(normals)} normal images in {source}: need at least 2")
    fit_idx, cal_idx = grouped_holdout(normals, calibration_fraction, seed)
    det = get_detector_class(detector)(**dict(params or {}, name=name, version=version))
    t0 = time.perf_counter()
    seqs = load_sequences(normals, workers=workers)
    det.fit([seqs[i] for i in fit_idx], validation=[seqs[i] for i in cal_idx], seed=seed)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    files = save_model(det, out)
    if command_args is not None:
        from training.environment import software_environment

        doc = {"train_seconds": round(seconds, 1), "history": getattr(det, "history", None),
               "threshold": det.threshold, "fit_normals": len(fit_idx), "calibration_normals": len(cal_idx),
               "environment": software_environment(),
               # paths reduced to their names: model folders must not carry machine paths
               "command_args": {k: (Path(v).name if isinstance(v, Path) else v) for k, v in command_args.items()}}
        (out / "training.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
        files.append("training.json")
    card = ModelCard(
        name=name, version=version, detector=detector,
        scope=Scope(modalities=tuple(modalities) or ("OT",), body_parts=tuple(body_parts),
                    description=f"{'/'.join(modalities)} {'/'.join(body_parts) or 'any body part'}"),
        description=description,
        intended_use=f"Research and workflow evaluation beside a PACS; flags studies for review. {NOT_FOR_DIAGNOSTIC_USE}.",
        limitations=tuple(limitations),
        training_data=f"{len(fit_idx)} training-split normals {fitted}, {len(cal_idx)} grouped held-out "
                      f"training-split normals for calibration, from {Path(source).name} (seed {seed})",
        files={n: sha256_file(out / n) for n in files},
        params=det.get_params(),
    )
    card.write(out)
    log.info("%s: %d fit + %d calibration normals; threshold %.5g; %.1f s -> %s", name, len(fit_idx),
             len(cal_idx), det.threshold, seconds, out)
    return card
