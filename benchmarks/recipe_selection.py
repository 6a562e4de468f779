"""MedGRU-SVC recipe selection on a VALIDATION split cut from the training split (test untouched).

How the 4.0.0 encoder size and training length (``results/medgru-v4.md``), the 5.0.0 embedding
(``--grids``, ``results/medgru-v5.md``) and the 6.0.0 brain model's skip block (``--skip``,
``results/medgru-v6.md``) were chosen:

* backbone maps (the detector's own preprocessing: CLAHE, frozen EfficientNet-Lite0 multi-scale map) of
  all TRAIN-split normals and of 500 random TRAIN-split anomalies (seed 0);
* the normals are split by patient group (path where there is none): 75 % fit, 25 % held out (seed 0);
* for each configuration ``h=HIDDEN,r=REDUCE,e=EPOCHS`` the ConvGRU (reducer PCA-initialised, trained to
  reconstruct the standardised backbone map, normals only, as ``medgru train --loss reconstruct``) is fit
  on the fit normals; then heads on GAP(h_T) of the fit normals score held-out normals vs the train
  anomalies: a Gaussian (Ledoit-Wolf Mahalanobis), mean 5-NN distance, and the whitened RBF SVDD over a
  small (gamma, nu) grid. ``gap`` instead of a configuration uses GAP of the frozen maps (no ConvGRU).

The anomaly labels of the train split are used here to compare configurations: a model-selection use of
labels, reported as such. No test image is read.

    python benchmarks/recipe_selection.py --dataset brain_mri h=64,r=128,e=12 h=128,r=256,e=30 gap
    python benchmarks/recipe_selection.py --dataset brain_mri --grids 1,2,3,4 h=128,r=256,e=30 gap
    python benchmarks/recipe_selection.py --dataset brain_mri --grids 1,3 --skip maps,reduced h=128,r=256,e=30 gap

``--skip`` also scores each ConvGRU embedding with a block appended (z-scored as ``MedGRUSVC(skip=...)``
does), and the ``reduced`` block alone, to show what the ConvGRU adds to it.

``--hflip`` also trains each configuration on the fit normals plus their left-right mirror images (the
mirrored preprocessed image through the backbone; the heads are fit on both too) and scores it on the
same held-out normals and anomalies: mirror augmentation, a candidate for the brain (roughly symmetric),
not for the chest (the heart is on the left). Measured for 6.0.0 in ``results/medgru-v6.md``:

    python benchmarks/recipe_selection.py --dataset brain_mri --skip reduced --hflip h=128,r=256,e=30
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def auroc(neg, pos) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]))


def heads(ef: np.ndarray, en: np.ndarray, ea: np.ndarray) -> dict[str, float]:
    from sklearn.covariance import LedoitWolf
    from sklearn.neighbors import NearestNeighbors

    from inference.svdd import SVDDBoundary

    res: dict[str, float] = {}
    mu, prec = ef.mean(0), LedoitWolf().fit(ef).precision_
    res["gauss"] = auroc(*(np.einsum("ij,jk,ik->i", e - mu, prec, e - mu) for e in (en, ea)))
    sd = ef.std(0) + 1e-6
    nn = NearestNeighbors(n_neighbors=5).fit((ef - mu) / sd)
    res["knn5"] = auroc(*(nn.kneighbors((e - mu) / sd)[0].mean(1) for e in (en, ea)))
    for g in (0.05, 0.3, 1, 3):
        for nu in (0.05, 0.2):
            try:
                b = SVDDBoundary(gamma=g, nu=nu, whiten=True).fit(ef)
            except ValueError:
                continue
            res[f"svdd g{g} nu{nu}"] = auroc(b.score(en), b.score(ea))
    return res


def validation_maps(dataset: str, data_root: Path, cache_dir: Path | None):
    """Backbone maps ``(fit normals, held-out normals, train anomalies)`` of the validation split above."""
    import tempfile

    import torch

    from inference.detectors.medgru_svc import MedGRUSVC
    from training.manifest import read_manifest
    from training.train import FeatureCache

    rows = read_manifest(data_root / dataset / "manifest.csv")
    rng = np.random.default_rng(0)
    normals = [r for r in rows if r.split == "train" and r.is_normal]
    anomalies = [r for r in rows if r.split == "train" and not r.is_normal]
    anomalies = [anomalies[i] for i in sorted(rng.choice(len(anomalies), 500, replace=False))]
    groups = [r.group or str(r.path) for r in normals]
    uniq = sorted(set(groups))
    held_groups = set(np.random.default_rng(0).choice(uniq, len(uniq) // 4, replace=False).tolist())
    held = np.array([g in held_groups for g in groups])
    tmp = tempfile.TemporaryDirectory(prefix="recipe-maps-") if cache_dir is None else None
    cache = FeatureCache(cache_dir or Path(tmp.name), MedGRUSVC())  # the training code's own backbone maps
    maps_n, maps_a = cache.features(normals, desc="train normals"), cache.features(anomalies, desc="train anomalies")
    if tmp is not None:
        tmp.cleanup()
    mask = torch.from_numpy(held)
    fit_rows = [r for r, h in zip(normals, held) if not h]
    return maps_n[~mask], maps_n[mask], maps_a, fit_rows


def mirrored_maps(rows) -> "torch.Tensor":
    """``(N, 1, C, h, w)`` backbone maps of the rows' images mirrored left-right after the detector's own
    preprocessing (CLAHE's tiles divide the image evenly, so it commutes with the mirror)."""
    import torch

    from inference.detectors.medgru_svc import MedGRUSVC
    from training.manifest import load_sequences

    det = MedGRUSVC()
    out = []
    for i in range(0, len(rows), 32):
        seqs = load_sequences(rows[i:i + 32])
        pre = np.stack([det.preprocess(type(s)(frames=s.frames[-1:], bits_stored=s.bits_stored))[0]
                        for s in seqs])
        out.append(det.frame_features(np.ascontiguousarray(pre[..., ::-1])).half())
    return torch.cat(out)[:, None]


def trained_convgru(cfg: str, fit):
    """A MedGRU-SVC whose ConvGRU (``h=HIDDEN,r=REDUCE,e=EPOCHS[,lr=LR]``) is trained on ``fit`` as
    ``medgru train --loss reconstruct --reducer-init pca`` does (seed 0); no boundary."""
    import torch

    from inference.detectors.medgru_svc import MedGRUSVC

    kv = dict(x.split("=") for x in cfg.split(","))
    det = MedGRUSVC(hidden_channels=int(kv.get("h", 64)), reduce_channels=int(kv.get("r", 128)),
                    epochs=int(kv.get("e", 12)), lr=float(kv.get("lr", 1e-3)), loss="reconstruct",
                    reducer_init="pca")
    torch.manual_seed(0)
    det.encoder = det._new_encoder()
    det._train_encoder(fit, fit[:0], np.random.default_rng(0), progress=None, checkpoint=None, report={})
    return det


def skip_block(det, kind: str, maps) -> np.ndarray:
    """GAP of the last frame's frozen backbone maps (``maps``) or of its 1x1-reducer output (``reduced``)."""
    import torch

    last = maps[:, -1].float()
    if kind == "maps":
        return last.mean(dim=(2, 3)).double().numpy()
    if kind != "reduced":
        raise ValueError(f"unknown skip block {kind!r}")
    det.encoder.eval()
    with torch.no_grad():
        return torch.cat([det.encoder.reducer(last[i:i + 64]).mean(dim=(2, 3))
                          for i in range(0, len(last), 64)]).double().numpy()


def concat_z(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    """Concatenate two embeddings of (fit, held-out, anomalies) and z-score the columns on the fit rows,
    as ``MedGRUSVC(skip=...)`` does (a constant column's scale floored at 1e-3 of the median column's)."""
    from inference.detectors.medgru_svc import embedding_zscore

    cat = [np.concatenate([x, y], axis=1) for x, y in zip(a, b)]
    mu, sd = embedding_zscore(cat[0])
    print(f"  z-score: {int((cat[0].std(0) < 1e-6).sum())} of {sd.size} columns constant on the fit normals")
    return [(x - mu) / sd for x in cat]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, choices=("kermany_cxr", "brain_mri"))
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("MEDGRU_DATA_ROOT", "../shared/data")))
    ap.add_argument("--cache", type=Path, default=None,
                    help="backbone-map cache folder (default: a temporary folder, removed afterwards)")
    ap.add_argument("--grids", default="1",
                    help="comma-separated embedding grids to compare on each trained ConvGRU: 1 = GAP of h_T "
                         "(the seed's default), g > 1 = h_T average-pooled to g x g and flattened")
    ap.add_argument("--skip", default="",
                    help="comma-separated: also score each ConvGRU embedding with a skip block appended, "
                         "'maps' = GAP of the frozen backbone maps of the last frame, 'reduced' = GAP of the "
                         "1x1 reducer's output of the last frame (each block z-scored on the fit normals)")
    ap.add_argument("--hflip", action="store_true",
                    help="also train each ConvGRU configuration on the fit normals plus their mirror images")
    ap.add_argument("configs", nargs="+", help="h=HIDDEN,r=REDUCE,e=EPOCHS[,lr=LR] or gap")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    fit_plain, vn, va, fit_rows = validation_maps(args.dataset, args.data_root, args.cache)
    print(f"{args.dataset}: {len(fit_plain)} fit normals, {len(vn)} held-out normals, "
          f"{len(va)} train anomalies (validation)")
    grids = [int(g) for g in args.grids.split(",")]
    runs = [(cfg, "", fit_plain) for cfg in args.configs]
    if args.hflip:
        both = torch.cat([fit_plain, mirrored_maps(fit_rows)])
        runs += [(cfg, "[hflip-trained]", both) for cfg in args.configs if cfg != "gap"]
    for cfg, tag, fit in runs:
        t0 = time.perf_counter()
        if cfg == "gap":
            rows_out = [("gap", [m[:, 0].float().mean(dim=(2, 3)).double().numpy() for m in (fit, vn, va)])]
        else:
            det = trained_convgru(cfg, fit)
            rows_out = []
            for g in grids:
                det.embedding, det.flatten_grid = ("gap", 4) if g == 1 else ("flatten", g)
                name = (cfg if g == 1 else f"{cfg},grid={g}") + tag
                emb = [det.embed_features(m) for m in (fit, vn, va)]
                rows_out.append((name, emb))
                for kind in filter(None, args.skip.split(",")):
                    block = [skip_block(det, kind, m) for m in (fit, vn, va)]
                    rows_out.append((f"{name}+{kind}", concat_z(emb, block)))
                    if g == grids[0] and kind == "reduced":  # the block alone: what the ConvGRU adds to it
                        rows_out.append((f"{cfg}{tag}:reduced only", block))
        fit_s = time.perf_counter() - t0
        for name, emb in rows_out:
            res = heads(*emb)
            svdd = [v for k, v in res.items() if k.startswith("svdd")]
            print(f"{name:<22} {fit_s:6.0f} s  gauss {res['gauss']:.3f}  knn5 {res['knn5']:.3f}  "
                  f"SVDD {min(svdd):.3f}-{max(svdd):.3f}  " + " ".join(f"{k[5:]}={v:.3f}" for k, v in res.items()
                                                                    if k.startswith("svdd")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
