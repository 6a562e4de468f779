"""Where the SVDD boundary lies in the flattened (5.0.0) embedding: held-out normals outside the sphere.

On the validation split of ``recipe_selection.py`` (train split only; test untouched), with the
5.0.0 ConvGRU recipe (h=128, r=256, 30 epochs) trained on the fit normals, for GAP (grid 1) and the
3 x 3 flattened embedding (1152-d), and each of these kernels' input spaces:

* ``whiten``: Ledoit-Wolf Sigma^-1/2 (the models' setting);
* ``shrinkN``: the same with the covariance shrunk by a fixed N (more shrinkage = closer to standardised);
* ``pcaK``: whitened top-K principal components of the fit normals;
* ``standardise``: per-dimension mean / std;

an RBF SVDD over a few (gamma, nu) reports the share of held-out normals and of train-split anomalies
outside the sphere (score > 0) and the AUROC between them. The anomaly labels of the train split are
used to measure, not to fit (as in ``recipe_selection.py``).

    python benchmarks/boundary_probe.py --dataset brain_mri [--cache DIR] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.recipe_selection import auroc, trained_convgru, validation_maps  # noqa: E402

GRID = ((0.3, 0.05), (1.0, 0.05), (3.0, 0.05), (1.0, 0.2))


def input_spaces(ef: np.ndarray) -> dict[str, tuple]:
    """name -> (transform fitted on ``ef``, whether SVDDBoundary whitens it itself)."""
    from sklearn.covariance import LedoitWolf, ShrunkCovariance

    out: dict[str, tuple] = {"whiten": (lambda x: x, True), "standardise": (lambda x: x, False)}
    mu = ef.mean(0)
    lw = LedoitWolf().fit(ef).shrinkage_
    for s in (0.2, 0.4):
        if s > lw:
            ev, v = np.linalg.eigh(ShrunkCovariance(shrinkage=s).fit(ef).covariance_)
            w = (v / np.sqrt(np.maximum(ev, 1e-12))) @ v.T
            out[f"shrink{s}"] = ((lambda x, w=w: (x - mu) @ w), False)
    _, sv, vt = np.linalg.svd(ef - mu, full_matrices=False)
    for k in (64, 256):
        if k < ef.shape[1]:
            p = vt[:k].T / (sv[:k] / np.sqrt(len(ef) - 1))
            out[f"pca{k}"] = ((lambda x, p=p: (x - mu) @ p), False)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, choices=("kermany_cxr", "brain_mri"))
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("MEDGRU_DATA_ROOT", "../shared/data")))
    ap.add_argument("--cache", type=Path, default=None, help="backbone-map cache folder")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    import torch

    from inference.svdd import SVDDBoundary

    torch.set_num_threads(2)
    fit, vn, va, _, _ = validation_maps(args.dataset, args.data_root, args.cache)
    det = trained_convgru("h=128,r=256,e=30", fit)
    rows = []
    for grid in (1, 3):
        det.embedding, det.flatten_grid = ("gap", 4) if grid == 1 else ("flatten", grid)
        ef, en, ea = (det.embed_features(m) for m in (fit, vn, va))
        for name, (f, whiten) in input_spaces(ef).items():
            for g, nu in GRID:
                b = SVDDBoundary(gamma=g, nu=nu, whiten=whiten).fit(f(ef))
                sn, sa = b.score(f(en)), b.score(f(ea))
                rows.append({"grid": grid, "dim": int(ef.shape[1]), "space": name, "gamma": g, "nu": nu,
                             "heldout_normals_outside": float(np.mean(sn > 0)),
                             "anomalies_outside": float(np.mean(sa > 0)), "auroc": auroc(sn, sa)})
                r = rows[-1]
                print(f"grid {grid} ({r['dim']}-d) {name:<12} gamma {g:<4} nu {nu:<5} held-out normals outside "
                      f"{r['heldout_normals_outside']:.3f}  anomalies outside {r['anomalies_outside']:.3f}  "
                      f"AUROC {r['auroc']:.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"boundary_probe-{args.dataset}"
    meta = {"dataset": args.dataset, "fit_normals": len(fit), "heldout_normals": len(vn), "train_anomalies": len(va),
            "encoder": "h=128,r=256,e=30 (5.0.0 recipe), trained on the fit normals",
            "command": f"python benchmarks/boundary_probe.py --dataset {args.dataset}", "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [f"# SVDD boundary probe: {args.dataset}", "",
             f"Validation split of `recipe_selection.py` ({len(fit)} fit normals, {len(vn)} held-out normals, "
             f"{len(va)} train-split anomalies); ConvGRU h=128, r=256, 30 epochs. Command: `{meta['command']}`.", "",
             "| embedding | kernel input | gamma | nu | held-out normals outside | anomalies outside | AUROC |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        emb = "GAP (128-d)" if r["grid"] == 1 else f"flatten {r['grid']}x{r['grid']} ({r['dim']}-d)"
        lines.append(f"| {emb} | {r['space']} | {r['gamma']} | {r['nu']} | {r['heldout_normals_outside']:.3f} | "
                     f"{r['anomalies_outside']:.3f} | {r['auroc']:.3f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"written: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
