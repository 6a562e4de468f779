"""Copy a slice of a benchmark data set into ``.devdata/`` so that it can travel to the GPU machine.

The device tool sends the repository's working tree and nothing beside it (at most 64 MiB), so the data a
GPU run reads must lie inside the checkout for that run. ``.devdata/`` is git-ignored, is never committed,
and is removed again after the run (``rm -rf .devdata``). The copy keeps each file's relative path and
rewrites the manifest to the copied rows only.

    python benchmarks/device/make_slice.py --dataset kermany_cxr --splits train,test --normal-only train
    python benchmarks/device/make_slice.py --dataset brain_mri --splits test --sample 300 --seed 0

``--sample N`` keeps a seeded random N of the selected rows (the same N for the same seed and manifest), or
of those of ``--sample-splits`` only, keeping the other splits whole.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="folder name under the data root (e.g. kermany_cxr)")
    p.add_argument("--splits", default="train,test", help="comma-separated splits to copy")
    p.add_argument("--normal-only", default="", help="comma-separated splits of which only the normals are copied")
    p.add_argument("--sample", type=int, default=0, help="keep a seeded random N of the rows (0 = all)")
    p.add_argument("--sample-splits", default="",
                   help="comma-separated splits that --sample applies to (default: all the copied rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", type=Path, default=None, help="default: $MEDGRU_DATA_ROOT")
    p.add_argument("--out", type=Path, default=REPO / ".devdata")
    args = p.parse_args(argv)
    from training.metrics import is_normal_label

    root = args.data_root or (Path(os.environ["MEDGRU_DATA_ROOT"]) if os.environ.get("MEDGRU_DATA_ROOT") else None)
    if root is None or not (root / args.dataset / "manifest.csv").is_file():
        p.error(f"no {args.dataset}/manifest.csv under the data root (set MEDGRU_DATA_ROOT or --data-root)")
    src = root / args.dataset
    with (src / "manifest.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    splits = {s.strip() for s in args.splits.split(",") if s.strip()}
    normal_only = {s.strip() for s in args.normal_only.split(",") if s.strip()}
    rows = [r for r in rows if r.get("split", "") in splits
            and (r.get("split", "") not in normal_only or is_normal_label(r["label"]))]
    sample_splits = {s.strip() for s in args.sample_splits.split(",") if s.strip()}
    pool = [r for r in rows if not sample_splits or r.get("split", "") in sample_splits]
    if args.sample and len(pool) > args.sample:
        keep = sorted(np.random.default_rng(args.seed).choice(len(pool), args.sample, replace=False))
        kept = {id(pool[i]) for i in keep}
        rows = [r for r in rows if id(r) in kept or (sample_splits and r.get("split", "") not in sample_splits)]
    dst = args.out / args.dataset
    dst.mkdir(parents=True, exist_ok=True)
    size = 0
    for r in rows:
        target = dst / r["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / r["path"], target)
        size += target.stat().st_size
    with (dst / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    readme = args.out / "README.md"
    if not readme.is_file():
        readme.write_text("A transient slice of the benchmark data for one GPU run (benchmarks/device/make_slice.py); "
                          "provenance: the data root's README.md. Never committed.\n")
    print(f"{args.dataset}: {len(rows)} rows of splits {sorted(splits)}"
          f"{f' (only normals of {sorted(normal_only)})' if normal_only else ''}, {size / 2**20:.1f} MiB -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
