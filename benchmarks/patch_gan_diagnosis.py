"""Where a ``patch-gan`` model's score comes from, on the TRAIN split only (no test image is read).

    python benchmarks/patch_gan_diagnosis.py --manifest brain_mri/manifest.csv --model DIR [--anomalies 400]

* The model's own held-out calibration normals (the grouped share ``medgru train`` held out: same rows, same
  seed) and a seeded sample of the train split's anomalies (never used to fit the model).
* Label-free: for the normals, the share of the ``top_k`` ranked patches that are dark background (the
  patch's mean intensity below ``--dark``, 0.1), for the combined score and for each term alone.
* With the train labels (a diagnosis, not a choice: nothing of the model is set from it): the AUROC of
  held-out train normals against train anomalies for the combined score, for each term alone, and for the
  combined score ranked over tissue patches only.

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def main() -> int:
    import torch
    from sklearn.metrics import roc_auc_score

    from inference.api import load_model
    from training.baseline import grouped_holdout
    from training.manifest import load_sequences, read_manifest, rows_of_split

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--anomalies", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dark", type=float, default=0.1, help="a patch whose mean intensity is below this is background")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    manifest = args.manifest
    if not manifest.exists() and os.environ.get("MEDGRU_DATA_ROOT"):
        manifest = Path(os.environ["MEDGRU_DATA_ROOT"]) / manifest
    det = load_model(args.model)
    training = json.loads((args.model / "training.json").read_text())["command_args"]
    rows = rows_of_split(read_manifest(manifest), training.get("train_split", "train"))
    normals = [r for r in rows if r.is_normal]
    if training.get("max_normals"):
        normals = normals[: training["max_normals"]]
    _, cal = grouped_holdout(normals, training["knn_calibration_fraction"], training["seed"])
    anomalies = [r for r in rows if not r.is_normal]
    keep = np.sort(np.random.default_rng(0).permutation(len(anomalies))[: args.anomalies])
    chosen = [normals[i] for i in cal] + [anomalies[i] for i in keep]
    y = np.array([0] * len(cal) + [1] * len(keep))
    frames, _ = det._frames_of(load_sequences(chosen))
    rec, disc = det._patch_terms(frames)
    mr, sr, md, sd = det._stats
    zr, zd = (rec - mr) / sr, (disc - md) / sd
    combined = det._patch_scores(frames)
    p, g = det.patch_size, det.grid
    background = frames.reshape(-1, g, p, g, p).mean(axis=(2, 4)) < args.dark
    rows_out = []
    for name, patch in (("combined (the model's score)", combined), ("in-painting error alone", zr),
                        ("discriminator evidence alone", zd),
                        ("combined, ranked over tissue patches only", np.where(background, -np.inf, combined)),
                        ("combined, ranked over background patches only", np.where(background, combined, -np.inf))):
        flat = patch.reshape(len(patch), -1)
        top = np.argsort(-flat, axis=1, kind="stable")[:, : det.top_k]
        bg = np.take_along_axis(background.reshape(len(patch), -1), top, axis=1)
        auroc = roc_auc_score(y, det._rank(np.where(np.isfinite(patch), patch, -1e9)))
        rows_out.append(f"| {name} | {bg[y == 0].mean():.3f} | {bg[y == 1].mean():.3f} | {auroc:.3f} |")
    print(f"Model `{det.card.name}` {det.card.version}; {len(cal)} held-out train normals (the model's calibration "
          f"share), {len(keep)} train anomalies (seeded sample); share of patches that are background (mean < {args.dark:g}): "
          f"{background[y == 0].mean():.3f} of the normals', {background[y == 1].mean():.3f} of the anomalies'.\n")
    print(f"| score | share of the normals' top-{det.top_k} patches that are background | the same, anomalies | "
          "AUROC train normals vs train anomalies (diagnosis only) |")
    print("| --- | --- | --- | --- |")
    print("\n".join(rows_out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
