"""Training of the ``knn-effnet`` baseline (``medgru train --detector knn-effnet``).

Only rows of the training split whose label is normal are used; anomalies are never read. A grouped
share of those normals (``--calibration-fraction``, by the manifest's ``group`` column where present, so
one patient's images stay on one side) is held out to calibrate the split-conformal threshold at
``--target-fpr``; the rest is memorised.
"""

from __future__ import annotations

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
    from training.manifest import load_sequences

    if len(normals) < 2:
        raise ValueError(f"only {len(normals)} normal images in {source}: need at least 2")
    fit_idx, cal_idx = grouped_holdout(normals, calibration_fraction, seed)
    det = get_detector_class("knn-effnet")(**dict(params or {}, name=name, version=version))
    t0 = time.perf_counter()
    seqs = load_sequences(normals, workers=workers)
    det.fit([seqs[i] for i in fit_idx], validation=[seqs[i] for i in cal_idx], seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    files = save_model(det, out)
    bb = backbone_info()
    card = ModelCard(
        name=name, version=version, detector="knn-effnet",
        scope=Scope(modalities=tuple(modalities) or ("OT",), body_parts=tuple(body_parts),
                    description=f"{'/'.join(modalities)} {'/'.join(body_parts) or 'any body part'}"),
        description="k-NN distance on pooled frozen EfficientNet-Lite0 (ImageNet) features; patch-distance "
                    "heat maps; split-conformal threshold on held-out normals.",
        intended_use=f"Research and workflow evaluation beside a PACS; flags studies for review. {NOT_FOR_DIAGNOSTIC_USE}.",
        limitations=("Memorises training-normal features; sensitive to acquisition and style shift "
                     "(the threshold calibrated on training-split normals may not hold on other data).",
                     f"Backbone: {bb['name']} ({bb['weights_package']}); weights not in this folder.",
                     NOT_FOR_DIAGNOSTIC_USE),
        training_data=f"{len(fit_idx)} training-split normals memorised, {len(cal_idx)} grouped held-out "
                      f"training-split normals for calibration, from {Path(source).name} (seed {seed})",
        files={n: sha256_file(out / n) for n in files},
        params=det.get_params(),
    )
    card.write(out)
    log.info("%s: %d memorised + %d calibration normals; threshold %.5g; %.1f s -> %s", name, len(fit_idx),
             len(cal_idx), det.threshold, time.perf_counter() - t0, out)
    return card
