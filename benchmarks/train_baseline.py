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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from training.baseline import train_knn  # noqa: E402
from training.manifest import read_manifest  # noqa: E402
from training.metrics import is_normal_label  # noqa: E402


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
    params: dict = {}
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
    card = train_knn(rows, args.out, name=args.name, version=args.version, modalities=args.modality,
                     body_parts=args.body_part, source=str(args.manifest),
                     calibration_fraction=args.calibration_fraction, seed=args.seed, params=params)
    print(f"{card.name}: {card.training_data} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
