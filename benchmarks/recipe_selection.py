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

``--input-size S`` runs everything at another frame size (maps of S / 16 on a side; the default is the
detector's 224); ``--clip-limit`` and ``--tile-grid`` at other CLAHE parameters (default 2.0, 8).

``--reframe K`` (``results/medgru-v7.md``) asks whether a score detects the anomalies or the way the images
are framed. It adds a second validation set, the same held-out normals and train anomalies each randomly
re-framed once (:func:`inference.augment.reframe`: zoom, shift, small rotation), so that framing carries
no label there, and scores every row on both (``plain`` / ``reframed``). It also trains each
configuration on the fit normals plus K re-framed copies of each (``medgru train --reframe-copies K``),
and prints a template-correlation score (1 - correlation of a 56x56 thumbnail with the fit normals' mean
thumbnail), which sees framing and nothing else, on both validation sets:

    python benchmarks/recipe_selection.py --dataset kermany_cxr --grids 3 --reframe 2 h=128,r=256,e=30 gap

``--reframe-blur SIGMA`` (with ``--reframe``; ``results/blur-v10-kermany_cxr.md``) asks the same of image
sharpness: a third validation set, the re-framed one blurred by a Gaussian of sigma uniform in [0, SIGMA]
px, a third training variant (K re-framed and blurred copies, ``medgru train --reframe-blur``), and a
high-pass score that sees sharpness only, on the three sets:

    python benchmarks/recipe_selection.py --dataset kermany_cxr --reframe 2 --reframe-blur 1.5 --augmented-only h=128,r=256,e=30

``--stretch`` stretches every frame with the service's robust window (0.5-99.5 percentiles,
``worker.pixels``) before the detector's preprocessing: per-image contrast normalisation, a candidate
recipe step (``results/serving_consistency.md`` showed it on test images first, so this validation
is not blind; its criterion is in ``results/stretch-validation.md``). Not with ``--cache``.

``--map-spectrum`` first prints where the frozen maps' signal lies among the principal directions of
their feature vectors, and the config keys ``init=pca-mix`` and ``loss=reconstruct-whitened`` train the
ConvGRU with another reducer start and target (``results/medgru-v8.md``):

    python benchmarks/recipe_selection.py --dataset brain_mri --map-spectrum --skip reduced \
        h=128,r=256,e=0,init=pca-mix h=128,r=256,e=30 h=128,r=256,e=30,init=pca-mix \
        h=128,r=256,e=30,loss=reconstruct-whitened h=128,r=256,e=30,init=pca-mix,loss=reconstruct-whitened
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

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


def use_stretched_frames() -> None:
    """From now on in this process, MedGRU-SVC preprocesses each frame after the service's robust window."""
    from inference.api import FrameSequence
    from inference.detectors.medgru_svc import MedGRUSVC
    from worker.pixels import _robust_window

    plain = MedGRUSVC.preprocess

    def preprocess(self, seq):
        frames = np.stack([_robust_window(f.astype(np.float64)) for f in seq.frames]).astype(np.float32)
        return plain(self, FrameSequence(frames=frames, modality=seq.modality, body_part=seq.body_part,
                                         bits_stored=seq.bits_stored))

    MedGRUSVC.preprocess = preprocess


def validation_maps(dataset: str, data_root: Path, cache_dir: Path | None, reframe_copies: int | None = None,
                    prep: dict | None = None, reframe_blur: float = 0.0):
    """Backbone maps ``(fit normals, held-out normals, train anomalies)`` of the validation split above,
    then the fit rows and ``extra``: empty, or with ``reframe_copies`` given, the re-framed validation maps
    (``vn_r``, ``va_r``), the fit normals' K re-framed copies (``fit_r``) and the framing-only scores."""
    import tempfile

    import torch

    from inference.augment import reframe_copy_seed
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
    cache = FeatureCache(cache_dir or Path(tmp.name), MedGRUSVC(**(prep or {})))  # training's own maps
    maps_n, maps_a = cache.features(normals, desc="train normals"), cache.features(anomalies, desc="train anomalies")
    mask = torch.from_numpy(held)
    fit_rows = [r for r, h in zip(normals, held) if not h]
    held_rows = [r for r, h in zip(normals, held) if h]
    extra = {}
    if reframe_copies is not None:  # re-framed validation (one copy each) and K re-framed copies of the fit
        extra["vn_r"] = cache.features(held_rows, reframe_seed=101, desc="held-out reframed")
        extra["va_r"] = cache.features(anomalies, reframe_seed=102, desc="anomalies reframed")
        extra["fit_r"] = [cache.features(fit_rows, reframe_seed=reframe_copy_seed(0, k), desc="fit reframed")
                          for k in range(reframe_copies)]
        extra["framing"] = framing_scores(fit_rows, held_rows, anomalies)
    if reframe_copies is not None and reframe_blur:  # the same transforms, then blurred (same seeds)
        from inference.augment import ReframeParams

        params = ReframeParams(blur=reframe_blur)
        extra["vn_rb"] = cache.features(held_rows, reframe_seed=101, reframe_params=params,
                                        desc="held-out reframed+blurred")
        extra["va_rb"] = cache.features(anomalies, reframe_seed=102, reframe_params=params,
                                        desc="anomalies reframed+blurred")
        extra["fit_rb"] = [cache.features(fit_rows, reframe_seed=reframe_copy_seed(0, k), reframe_params=params,
                                          desc="fit reframed+blurred") for k in range(reframe_copies)]
        extra["sharpness"] = sharpness_scores(held_rows, anomalies, params, prep or {})
    if tmp is not None:
        tmp.cleanup()
    return maps_n[~mask], maps_n[mask], maps_a, fit_rows, extra


def validation_frames(rows, seed: int | None = None, params=None):
    """``(last frame, its sequence)`` of each row, re-framed with ``np.random.default_rng(seed)`` (the seeds
    of the re-framed validation maps, so the same transforms as the detector sees there) unless ``seed``
    is None; ``params`` are the re-framing ranges (default ``ReframeParams()``)."""
    from inference.augment import ReframeParams, reframe
    from training.manifest import load_sequences

    rng = np.random.default_rng(seed) if seed is not None else None
    for s in load_sequences(rows):
        f = np.asarray(s.frames[-1], np.float32)
        yield (reframe(f, rng, params or ReframeParams()) if rng is not None else f), s


def framing_scores(fit_rows, held_rows, anomalies) -> dict[str, float]:
    """Validation AUROC of a score that sees framing only: 1 - correlation of each image's 56x56 thumbnail
    with the fit normals' mean thumbnail; on the images as acquired and re-framed as the validation's."""
    from training.style import thumbnail, thumbnail_template_of

    def thumbs(rows, seed=None):
        return np.stack([thumbnail(f) for f, _ in validation_frames(rows, seed)])

    template = thumbnail_template_of(thumbs(fit_rows))
    plain = auroc(1 - thumbs(held_rows) @ template, 1 - thumbs(anomalies) @ template)
    refr = auroc(1 - thumbs(held_rows, 101) @ template, 1 - thumbs(anomalies, 102) @ template)
    return {"plain": plain, "reframed": refr}


def sharpness_scores(held_rows, anomalies, params, prep: dict) -> dict[str, float]:
    """Validation AUROC of a score that sees sharpness only: the mean absolute high-pass residual (the frame
    minus its Gaussian blur of sigma 1 px) after the detector's CLAHE, normals taken as the sharper (so the
    score is minus it); on the images as acquired, re-framed, and re-framed and blurred as the validation's."""
    import cv2

    from inference.detectors.medgru_svc import MedGRUSVC

    det = MedGRUSVC(**prep)

    def scores(rows, seed=None, p=None):
        out = []
        for f, s in validation_frames(rows, seed, p):
            g = det.preprocess(type(s)(frames=f[None], bits_stored=s.bits_stored))[0].astype(np.float32)
            out.append(-float(np.abs(g - cv2.GaussianBlur(g, (0, 0), 1.0)).mean()))
        return np.array(out)

    return {"plain": auroc(scores(held_rows), scores(anomalies)),
            "reframed": auroc(scores(held_rows, 101), scores(anomalies, 102)),
            "reframed+blurred": auroc(scores(held_rows, 101, params), scores(anomalies, 102, params))}


def mirrored_maps(rows, prep: dict | None = None, det=None) -> torch.Tensor:
    """``(N, 1, C, h, w)`` backbone maps of the rows' images mirrored left-right after the detector's own
    preprocessing (CLAHE's tiles divide the image evenly, so it commutes with the mirror): ``det``'s, else
    that of a MedGRU-SVC with ``prep``."""
    import torch

    from inference.detectors.medgru_svc import MedGRUSVC
    from training.manifest import load_sequences

    det = det if det is not None else MedGRUSVC(**(prep or {}))
    out = []
    for i in range(0, len(rows), 32):
        seqs = load_sequences(rows[i:i + 32])
        pre = np.stack([det.preprocess(type(s)(frames=s.frames[-1:], bits_stored=s.bits_stored))[0]
                        for s in seqs])
        out.append(det.frame_features(np.ascontiguousarray(pre[..., ::-1])).half())
    return torch.cat(out)[:, None]


def trained_convgru(cfg: str, fit, prep: dict | None = None):
    """A MedGRU-SVC whose ConvGRU (``h=HIDDEN,r=REDUCE,e=EPOCHS[,lr=LR][,init=INIT][,loss=LOSS]``) is trained
    on ``fit`` as ``medgru train --loss reconstruct --reducer-init pca`` does (seed 0), or with that
    ``--reducer-init`` and ``--loss`` (``init=pca-mix``, ``loss=reconstruct-whitened``); no boundary."""
    import torch

    from inference.detectors.medgru_svc import MedGRUSVC

    kv = dict(x.split("=") for x in cfg.split(","))
    det = MedGRUSVC(**(prep or {}), hidden_channels=int(kv.get("h", 64)),
                    reduce_channels=int(kv.get("r", 128)), epochs=int(kv.get("e", 12)),
                    lr=float(kv.get("lr", 1e-3)), loss=kv.get("loss", "reconstruct"),
                    reducer_init=kv.get("init", "pca"))
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


def map_spectrum(fit, vn, va, ks=(32, 64, 128, 192, 256, 384)) -> list[dict[str, float]]:
    """Where the frozen maps' validation signal lies among the principal directions of their feature
    vectors (one per position, last frame; the PCA the ``pca`` reducer start takes from the fit normals):
    the Mahalanobis AUROC of GAP of the maps projected on the top ``k`` components and on the rest, and
    the variance share of the top ``k``."""
    import torch
    from sklearn.covariance import LedoitWolf

    from inference.detectors.medgru_svc import feature_pca

    mean, comps, sd = feature_pca(fit)
    gap = [m[:, -1].float().mean(dim=(2, 3)) - mean for m in (fit, vn, va)]

    def maha(e: list[torch.Tensor]) -> float:
        ef, en, ea = (t.double().numpy() for t in e)
        mu, prec = ef.mean(0), LedoitWolf().fit(ef).precision_
        return auroc(*(np.einsum("ij,jk,ik->i", q - mu, prec, q - mu) for q in (en, ea)))

    var = sd.double() ** 2
    return [{"k": k, "top": maha([g @ comps[:k].T for g in gap]), "rest": maha([g @ comps[k:].T for g in gap]),
             "variance_share_top": float(var[:k].sum() / var.sum())} for k in ks if k < comps.shape[0]]


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
    ap.add_argument("--reframe", type=int, default=None, metavar="K",
                    help="also score every row on a re-framed validation set (framing carries no label there) "
                         "and train each configuration on the fit normals plus K re-framed copies of each")
    ap.add_argument("--reframe-blur", type=float, default=0.0, metavar="SIGMA",
                    help="with --reframe: also score every row on the re-framed validation set blurred (sigma "
                         "uniform in [0, SIGMA] px at 224; sharpness carries no label there either) and train "
                         "each configuration on the fit normals plus K re-framed and blurred copies")
    ap.add_argument("--input-size", type=int, default=224,
                    help="frame size after preprocessing (medgru train --input-size): the backbone maps are "
                         "size / 16 on a side")
    ap.add_argument("--clip-limit", type=float, default=2.0, help="CLAHE clip limit (medgru train --clip-limit)")
    ap.add_argument("--tile-grid", type=int, default=8, help="CLAHE tile grid (medgru train --tile-grid)")
    ap.add_argument("--augmented-only", action="store_true",
                    help="with --hflip or --reframe: train only the augmented variant of each configuration")
    ap.add_argument("--map-spectrum", action="store_true",
                    help="first print where the frozen maps' signal lies among the principal directions of "
                         "their feature vectors (map_spectrum)")
    ap.add_argument("--stretch", action="store_true",
                    help="robust-window each frame before the detector's preprocessing (not with --cache)")
    ap.add_argument("configs", nargs="+",
                    help="h=HIDDEN,r=REDUCE,e=EPOCHS[,lr=LR][,init=pca|pca-mix][,loss=reconstruct|"
                         "reconstruct-whitened] or gap")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    if args.stretch:
        if args.cache is not None:
            raise SystemExit("--stretch keeps its maps apart: run it without --cache")
        use_stretched_frames()
    # the detector's preprocessing: frame size and CLAHE (each setting has its own cached maps)
    prep = {"input_size": args.input_size, "clip_limit": args.clip_limit, "tile_grid": args.tile_grid}
    fit_plain, vn, va, fit_rows, extra = validation_maps(args.dataset, args.data_root, args.cache,
                                                         reframe_copies=args.reframe, prep=prep,
                                                         reframe_blur=args.reframe_blur)
    held_sets = [(vn, va)]
    if extra:
        held_sets.append((extra["vn_r"], extra["va_r"]))
        print("template-correlation (framing only) score: validation AUROC plain {plain:.3f}, "
              "reframed {reframed:.3f}".format(**extra["framing"]))
    if "vn_rb" in extra:
        held_sets.append((extra["vn_rb"], extra["va_rb"]))
        print("high-pass (sharpness only) score: validation AUROC " + ", ".join(
            f"{k} {v:.3f}" for k, v in extra["sharpness"].items()))
    set_names = ["plain", "reframed", "reframed+blurred"][:len(held_sets)]
    print(f"{args.dataset} at {args.input_size}x{args.input_size}, CLAHE clip {args.clip_limit} tiles "
          f"{args.tile_grid}: {len(fit_plain)} fit normals, "
          f"{len(vn)} held-out normals, "
          f"{len(va)} train anomalies (validation)")
    if args.map_spectrum:
        print("frozen maps, principal directions of the feature vectors (fit normals): Mahalanobis AUROC of "
              "GAP on the top k / on the rest")
        for r in map_spectrum(fit_plain, vn, va):
            print(f"  k={r['k']:<4} top {r['top']:.3f}  rest {r['rest']:.3f}  variance share of the top "
                  f"{r['variance_share_top']:.3f}", flush=True)
    grids = [int(g) for g in args.grids.split(",")]
    runs = [] if args.augmented_only else [(cfg, "", fit_plain) for cfg in args.configs]
    if args.hflip:
        both = torch.cat([fit_plain, mirrored_maps(fit_rows, prep)])
        runs += [(cfg, "[hflip-trained]", both) for cfg in args.configs if cfg != "gap"]
    if args.reframe:
        augmented = torch.cat([fit_plain, *extra["fit_r"]])
        runs += [(cfg, f"[+{args.reframe} reframed]", augmented) for cfg in args.configs]
    if args.reframe and args.reframe_blur:
        blurred = torch.cat([fit_plain, *extra["fit_rb"]])
        runs += [(cfg, f"[+{args.reframe} reframed+blurred]", blurred) for cfg in args.configs]
    for cfg, tag, fit in runs:
        t0 = time.perf_counter()
        maps = [fit, *(m for pair in held_sets for m in pair)]
        if cfg == "gap":
            rows_out = [("gap" + tag, [m[:, 0].float().mean(dim=(2, 3)).double().numpy() for m in maps])]
        else:
            det = trained_convgru(cfg, fit, prep)
            rows_out = []
            for g in grids:
                det.embedding, det.flatten_grid = ("gap", 4) if g == 1 else ("flatten", g)
                name = (cfg if g == 1 else f"{cfg},grid={g}") + tag
                emb = [det.embed_features(m) for m in maps]
                rows_out.append((name, emb))
                for kind in filter(None, args.skip.split(",")):
                    block = [skip_block(det, kind, m) for m in maps]
                    rows_out.append((f"{name}+{kind}", concat_z(emb, block)))
                    if g == grids[0] and kind == "reduced":  # the block alone: what the ConvGRU adds to it
                        rows_out.append((f"{cfg}{tag}:reduced only", block))
        fit_s = time.perf_counter() - t0
        for name, emb in rows_out:
            for i, set_name in enumerate(set_names):
                res = heads(emb[0], emb[1 + 2 * i], emb[2 + 2 * i])
                svdd = [v for k, v in res.items() if k.startswith("svdd")]
                label = name if len(set_names) == 1 else f"{name} | {set_name}"
                print(f"{label:<22} {fit_s:6.0f} s  gauss {res['gauss']:.3f}  knn5 {res['knn5']:.3f}  "
                      f"SVDD {min(svdd):.3f}-{max(svdd):.3f}  " + " ".join(
                          f"{k[5:]}={v:.3f}" for k, v in res.items() if k.startswith("svdd")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
