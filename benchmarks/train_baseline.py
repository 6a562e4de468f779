"""Fit the ``knn-effnet`` baseline on a manifest's TRAIN normals and save a model folder.

Only rows of the ``train`` split whose label is normal are used; anomalies are never read. A grouped
20 % of those normals (by the manifest's ``group`` column where present, so one patient's images stay on
one side) is held out to calibrate the split-conformal threshold (5 % FPR); the rest is memorised.

    python benchmarks/train_baseline.py --manifest $MEDGRU_DATA_ROOT/kermany_cxr/manifest.csv \\
        --out /tmp/knn-chest --name knn-effnet-chest --modality CR --modality DX --body-part CHEST

The model folder is for evaluation runs; it is not committed (it memorises training features).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from inference.api import ModelCard, Scope, get_detector_class, sha256_file  # noqa: E402
from training.manifest import load_sequences, read_manifest  # noqa: E402
from training.metrics import is_normal_label  # noqa: E402


def grouped_holdout(rows, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (fit, calibration): about ``fraction`` of the groups (or rows) go to calibration."""
    rng = np.random.default_rng(seed)
    groups = [r.group or f"__row{i}" for i, r in enumerate(rows)]
    uniq = sorted(set(groups))
    rng.shuffle(uniq)
    cal_groups = set(uniq[: max(1, int(round(fraction * len(uniq))))])
    cal = [i for i, g in enumerate(groups) if g in cal_groups]
    fit = [i for i, g in enumerate(groups) if g not in cal_groups]
    return fit, cal


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--name", default="knn-effnet")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--modality", action="append", default=[], help="scope modality (repeatable)")
    p.add_argument("--body-part", action="append", default=[], help="scope body part (repeatable)")
    p.add_argument("--calibration-fraction", type=float, default=0.2)
    p.add_argument("--limit", type=int, default=0, help="use at most N train normals (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="detector hyper-parameter override (int/float/str)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rows = [r for r in read_manifest(args.manifest)
            if (r.split or "").lower() == "train" and is_normal_label(r.label)]
    if args.limit:
        rows = rows[: args.limit]
    if len(rows) < 2:
        print(f"error: {args.manifest} has {len(rows)} train normals", file=sys.stderr)
        return 2
    fit_idx, cal_idx = grouped_holdout(rows, args.calibration_fraction, args.seed)
    cls = get_detector_class("knn-effnet")
    params = dict(name=args.name, version=args.version)
    for kv in args.param:
        key, _, value = kv.partition("=")
        for conv in (int, float):
            try:
                params[key] = conv(value)
                break
            except ValueError:
                continue
        else:
            params[key] = value
    det = cls(**params)
    t0 = time.perf_counter()
    seqs = load_sequences(rows, workers=2)
    t1 = time.perf_counter()
    det.fit([seqs[i] for i in fit_idx], validation=[seqs[i] for i in cal_idx], seed=args.seed)
    t2 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    files = det.save(args.out)
    from inference.backbone import backbone_info

    card = ModelCard(
        name=args.name, version=args.version, detector="knn-effnet",
        scope=Scope(modalities=tuple(args.modality or ("OT",)), body_parts=tuple(args.body_part)),
        description="Baseline: k-NN distance on pooled frozen EfficientNet-Lite0 (ImageNet) features; "
                    "patch-distance heat maps; split-conformal threshold at 5% FPR.",
        intended_use="Research baseline for comparing detectors. NOT FOR DIAGNOSTIC USE.",
        limitations=("Memorises training-normal features; sensitive to acquisition/style shift.",
                     f"Backbone: {backbone_info()['name']} ({backbone_info()['weights_package']})"),
        training_data=f"{len(fit_idx)} train-split normals memorised, {len(cal_idx)} grouped held-out "
                      f"train-split normals for calibration, from {args.manifest.name} (seed {args.seed})",
        files={n: sha256_file(args.out / n) for n in files},
        params=det.get_params(),
    )
    card.write(args.out)
    print(f"{args.name}: {len(fit_idx)} memorised + {len(cal_idx)} calibration normals; threshold "
          f"{det.threshold:.5g}; load {t1 - t0:.1f} s, fit {t2 - t1:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
