"""MedGRU-SVC: CLAHE -> frozen EfficientNet-Lite0 feature maps -> 1x1 reducer -> ConvGRU over T ->
GAP of ``h_T`` -> RBF SVDD boundary (score = distance outside) -> support-vector clustering names the
anomaly type; Grad-CAM of the score on the ConvGRU hidden states explains it.

Training (normals only, see :meth:`MedGRUSVC.fit_features`):

1. The ConvGRU (and its 1x1 reducer) is trained with one of

   * ``loss="reconstruct"`` (self-supervised, normals only, no synthetic data): a 1x1 decoder must rebuild
     the per-channel standardised backbone map of the last frame from ``h_T``, so ``h_T`` keeps the
     frozen features' information (an information-preserving bottleneck; with ``reducer_init="pca"``
     it starts from whitened PCA of the features). The decoder is discarded after training.
   * ``loss="deep-sad"`` / ``"hsc"``: the Deep SAD objective (Ruff et al. 2020) or the hypersphere
     classifier: normal embeddings are pulled towards a fixed centre ``c`` and synthetic anomalies made
     from normals (:mod:`inference.synthetic`, outlier exposure) are pushed away. Measured on Kermany and
     brain MRI, this outlier exposure made the embedding worse for real anomalies than the frozen
     features (``benchmarks/results/ablations-*.md``).
2. The SVDD's ``gamma`` and ``nu`` are chosen by Bayesian optimisation (optuna TPE) on held-out normals,
   never a real anomaly, never test data, with one of

   * ``hpo_objective="tax-duin"`` (label-free, Tax & Duin 2004): minimise the share of held-out normals
     rejected plus the share of a reference volume accepted; the reference is a Gaussian with the
     training embeddings' mean and (shrunk) covariance (a uniform box is empty in tens of dimensions);
     ``nu`` is searched in ``[0.01, nu_max]``;
   * ``hpo_objective="consistent-volume"`` (label-free, Tax & Muller 2004): the smallest envelope share
     accepted among the boundaries whose held-out rejection is consistent with ``nu`` (the least
     violating one where none is);
   * ``hpo_objective="heldout-likelihood"`` (label-free): the largest mean log-likelihood of the held-out
     normals under the boundary's kernel expansion read as a density (likelihood cross-validation of the
     kernel width; ``gamma`` in ``LIKELIHOOD_GAMMA_RANGE``). In hundreds of dimensions it picks a narrow
     kernel: every training embedding becomes a support vector and the score ranks like a distance to the
     nearest training normals (the bundled brain model, ``benchmarks/results/medgru-v8.md``);
   * ``hpo_objective="synthetic-auroc"``: the AUROC of held-out normals vs synthetic anomalies made from
     them (this chose ``nu`` near 0.47 and did not predict real-anomaly AUROC).

   With ``whiten=True`` the RBF kernel acts on Ledoit-Wolf whitened embeddings (Mahalanobis distance)
   instead of per-dimension standardised ones. The score is the log-kernel distance outside the boundary (:class:`inference.svdd.SVDDBoundary`),
   finite and non-saturating far from the data, so Grad-CAM has a gradient there too.
3. The threshold is the split-conformal quantile of held-out calibration normals at ``target_fpr``.
4. Support-vector clustering (k-NN labelling) of a pool of anomalous embeddings gives ``cluster-N`` names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.api import (Detection, Detector, FrameSequence, ModelCard,
                           register_detector)
from inference.backbone import FEATURE_CHANNELS, extract_feature_maps, load_backbone
from inference.convgru import ConvRecurrentEncoder, embed_hidden
from inference.gradcam import grad_cam
from inference.preprocess import preprocess_frames
from inference.svdd import (ClusterModel, SVDDBoundary, TorchRBFBoundary, auto_support_vector_clustering,
                            support_vector_clustering)

log = logging.getLogger(__name__)
T = TypeVar("T")

ENCODER_FILE = "encoder.pt"
HEAD_FILE = "svdd.npz"
META_FILE = "meta.json"
#: encoder objectives: Deep SAD / hypersphere classifier with synthetic outlier exposure, or
#: "reconstruct" (self-supervised, normals only: a 1x1 decoder must rebuild the frozen feature map of
#: the last frame from h_T, so the embedding keeps the backbone's information; the target is
#: standardised per channel), or "reconstruct-whitened" (the same with the PCA-whitened map as the
#: target, so that every principal direction of the features weighs alike in the loss)
LOSSES = ("deep-sad", "hsc", "reconstruct", "reconstruct-whitened")
RECONSTRUCT_LOSSES = ("reconstruct", "reconstruct-whitened")
#: how the 1x1 reducer starts: random, "pca" (the whitened leading principal components of the normals'
#: feature vectors, both signs) or "pca-mix" (a seeded random rotation of all whitened components, both
#: signs: no direction of the features is dropped in favour of the high-variance ones)
REDUCER_INITS = ("random", "pca", "pca-mix")
#: optuna objectives for the SVDD's gamma, nu: AUROC held-out normals vs synthetic anomalies, or the
#: label-free Tax & Duin error (held-out normals rejected + share of a Gaussian envelope accepted)
#: "consistent-volume" (label-free, Tax & Muller 2004): the smallest envelope share accepted among the
#: boundaries whose held-out rejection is consistent with nu (<= nu + 2 sqrt(nu (1 - nu) / n))
#: "heldout-likelihood" (label-free): the largest mean log-likelihood of the held-out normals under the
#: boundary's kernel expansion read as a density (:meth:`inference.svdd.SVDDBoundary.log_density`):
#: likelihood cross-validation of the kernel width, which favours narrow kernels in many dimensions
HPO_OBJECTIVES = ("synthetic-auroc", "tax-duin", "consistent-volume", "heldout-likelihood")
#: optuna's range of the relative kernel width gamma (x 1/d), and the wider one of "heldout-likelihood",
#: whose optimum in hundreds of dimensions lies near the nearest-neighbour distance scale
GAMMA_RANGE = (1e-2, 1e1)
LIKELIHOOD_GAMMA_RANGE = (1e-2, 1e3)
#: how h_T becomes the embedding (see :func:`inference.convgru.embed_hidden`)
EMBEDDINGS = ("gap", "flatten")
#: what is appended to the h_T embedding: nothing (the seed), or "reduced": GAP over frames and positions
#: of the ConvGRU's input (the 1x1-reduced backbone maps), a skip connection around the recurrence; with
#: a skip block the whole embedding is z-scored on the training normals (shift and scale kept in the model)
SKIPS = ("none", "reduced")


#: the parameters that change how the encoder is trained (with the seed and the data they make up an
#: encoder checkpoint's fingerprint); gamma, nu, the threshold and the clustering come after the encoder
ENCODER_TRAINING_PARAMS: frozenset[str] = frozenset((
    "input_size", "clip_limit", "tile_grid", "cell", "layers", "hidden_channels", "reduce_channels", "epochs",
    "lr", "batch_size", "weight_decay", "momentum", "optimizer", "oe_weight", "synthetic_per_normal", "loss",
    "reducer_init", "embedding", "flatten_grid", "skip"))
#: bumped when the checkpoint's contents or the training loop change meaning (3: denormals flushed to
#: zero while training, so a checkpoint of the earlier loop is not continued by this one)
CHECKPOINT_FORMAT = 3


#: the most frames :meth:`MedGRUSVC.score_grouped` sends through the backbone in one call (a sequence's
#: frames are never split). 256 frames of 224 x 224 raised a CPU process's peak memory by 435 MiB
GROUPED_FRAMES_PER_CALL = 256


def embedding_zscore(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) that z-score the columns of ``raw`` (training embeddings, one row each).

    A column constant on the normals (a ReLU channel that never fires) is not divided by ~0: its scale is
    floored at 1e-3 of the median column's, so a new activation there counts but cannot blow the score up
    by orders of magnitude."""
    sd = raw.std(0)
    return raw.mean(0), np.maximum(sd, max(1e-3 * float(np.median(sd)), 1e-6))


@torch.no_grad()
def flush_denormal_weights_(module: nn.Module) -> int:
    """Set the module's denormal float weights (0 < |w| < 1.2e-38 in float32) to zero; return how many.

    Weight decay leaves some weights there (the 5.0.0 chest encoder has 2,285 of 1.45 M), and CPUs
    compute with denormals at a fraction of their speed: Grad-CAM's backward pass through that encoder
    took 0.07 s instead of 0.02 s (``benchmarks/results/medgru-v5.md``). Their contribution to any output
    is below float32 resolution, so scores do not change. Applied when a model folder is loaded (the saved
    file stays as training wrote it, so a re-run of the training command reproduces it bit for bit).
    """
    n = 0
    for p in module.parameters():
        if p.is_floating_point():
            tiny = torch.finfo(p.dtype).tiny
            mask = (p != 0) & (p.abs() < tiny)
            k = int(mask.sum())
            if k:
                p[mask] = 0.0
                n += k
    return n


def _wait_until_thread_gone(thread: threading.Thread, timeout_s: float = 10.0) -> None:
    """Wait until ``thread``'s operating-system thread has ended, not only its Python part (``join``).

    After ``join`` the thread still runs its thread-local destructors, torch's among them, which take the
    GIL. When the interpreter is finalizing by then (Ctrl-C: ``medgru train`` returns at once), taking the GIL
    ends the thread by a forced unwind through C++ frames, and the process aborted ("terminate called without
    an active exception", SIGABRT instead of exit status 130). Linux shows a live thread in /proc; elsewhere
    this returns at once."""
    native = getattr(thread, "native_id", None)
    task = Path(f"/proc/self/task/{native}") if native is not None else None
    if task is None or not task.parent.is_dir():
        return
    deadline = time.monotonic() + timeout_s
    while task.exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # the GIL released: the ending thread's destructors can take it


def run_denormals_flushed(fn: Callable[[threading.Event], T]) -> T:
    """``fn(cancel)`` with CPU float arithmetic flushing denormals to zero, in every thread it computes on.

    Weight decay drives some weights and Adam moments below 1.2e-38, where a CPU computes at a fraction of
    its speed: training the chest ConvGRU on 2,976 maps slowed from 27 s to 96 s an epoch by epoch 11.
    Values that small are below float32 resolution next to any others, so the model learnt is the same
    up to rounding; the training loop runs this way (``CHECKPOINT_FORMAT`` 3).

    The flush mode (FTZ/DAZ in x86's MXCSR) belongs to a thread, and an OpenMP worker takes its mode from
    the thread that starts it, once, when it is started. ``torch.set_flush_denormal`` on a thread whose
    worker pool already runs therefore flushes on that thread alone; with 2 threads, a convolution over
    denormal inputs took 1.2 s instead of 0.03 s a call, and training epochs slowed from 15 s to 72 s.
    So ``fn`` runs in a new thread that sets the mode before its first parallel region: the workers it
    starts (its own OpenMP pool) inherit it. The caller's thread, pool and mode are left as they were; the
    new thread gets the caller's torch thread count and grad mode. ``fn``'s exception is raised here. An
    interruption here (Ctrl-C) sets ``cancel``, which ``fn`` should check between steps, and is re-raised
    once ``fn`` has returned.
    """
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    cancel = threading.Event()
    out: dict[str, Any] = {}

    def body() -> None:
        torch.set_flush_denormal(True)
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
        try:
            out["value"] = fn(cancel)
        except BaseException as exc:  # handed to the caller's thread below
            out["error"] = exc

    worker = threading.Thread(target=body, name="medgru-train", daemon=True)
    try:
        worker.start()
        while worker.is_alive():  # a timed wait: a signal taken by another thread still reaches this one
            worker.join(0.2)
    except BaseException:
        cancel.set()
        if worker.is_alive():
            worker.join()
        raise
    finally:
        _wait_until_thread_gone(worker)
    if "error" in out:
        raise out["error"]
    return out["value"]


@contextlib.contextmanager
def _weights_frozen(module: nn.Module):
    """``requires_grad`` off for the module's parameters inside the block, restored after."""
    params = list(module.parameters())
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield module
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def _cluster_gamma_param(value: float | str) -> float | str:
    """``cluster_gamma``: ``"auto"`` or a positive number (relative kernel width)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    g = float(value)
    if not (math.isfinite(g) and g > 0):
        raise ValueError(f"cluster_gamma must be 'auto' or a positive number, got {value!r}")
    return g


def consistency_bound(nu: float, n: int) -> float:
    """Tax & Muller's bound on the held-out rejection of a boundary with parameter ``nu`` on ``n`` held-out
    normals (``nu`` plus two binomial standard deviations), the ``consistent-volume`` objective's test."""
    return nu + 2.0 * math.sqrt(nu * (1.0 - nu) / n)


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    return float(roc_auc_score(y, np.r_[neg, pos]))


@torch.no_grad()
def feature_pca(train: torch.Tensor, max_vectors: int = 50000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of the feature vectors (one per position) of the last frames of ``train`` ``(N, T, C, H, W)``:
    ``(mean (C,), components (K, C) by decreasing variance, standard deviations (K,))``, from at most
    ``max_vectors`` vectors (a fixed-seed random subset). The deviations get 1e-6 added, so dividing by
    them whitens."""
    x = train[:, -1].float().permute(0, 2, 3, 1).reshape(-1, train.shape[2])
    if x.shape[0] > max_vectors:
        g = torch.Generator().manual_seed(0)
        x = x[torch.randperm(x.shape[0], generator=g)[:max_vectors]]
    mean = x.mean(0)
    _, s, v = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, v, s / math.sqrt(max(x.shape[0] - 1, 1)) + 1e-6


@register_detector("medgru-svc")
class MedGRUSVC(Detector):
    SMALL_PARAMS = {
        "input_size": 64, "hidden_channels": 8, "reduce_channels": 16, "epochs": 2, "batch_size": 4,
        "hpo_trials": 3,
    }
    #: ``load`` reads all three (meta.json for the params when the card has none, and the fit report)
    MODEL_FILES = (ENCODER_FILE, HEAD_FILE, META_FILE)

    def __init__(self, *, input_size: int = 224, clip_limit: float = 2.0, tile_grid: int = 8,
                 cell: str = "convgru", layers: int = 1, hidden_channels: int = 64,
                 reduce_channels: int = 128, epochs: int = 30, lr: float = 1e-3, batch_size: int = 16,
                 weight_decay: float = 1e-4, momentum: float = 0.9, optimizer: str = "adam",
                 oe_weight: float = 1.0, synthetic_per_normal: int = 1, gamma: float = 1.0, nu: float = 0.1,
                 hpo_trials: int = 25, hpo_fraction: float = 0.2, target_fpr: float = 0.05,
                 cluster_gamma: float | str = "auto", cluster_nu: float = 0.1, cluster_k: int = 10,
                 cluster_max_pool: int = 1000,
                 loss: str = "deep-sad", reducer_init: str = "random", hpo_objective: str = "synthetic-auroc",
                 nu_max: float = 0.5, envelope_samples: int = 4000, whiten: bool = False,
                 embedding: str = "gap", flatten_grid: int = 4, skip: str = "none", device: str = "cpu"):
        self.input_size = int(input_size)
        self.clip_limit = float(clip_limit)
        self.tile_grid = int(tile_grid)
        self.cell = str(cell)
        self.layers = int(layers)
        self.hidden_channels = int(hidden_channels)
        self.reduce_channels = int(reduce_channels)
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.weight_decay = float(weight_decay)
        self.momentum = float(momentum)
        self.optimizer = str(optimizer)
        self.oe_weight = float(oe_weight)
        self.synthetic_per_normal = int(synthetic_per_normal)
        self.gamma = float(gamma)
        self.nu = float(nu)
        self.hpo_trials = int(hpo_trials)
        self.hpo_fraction = float(hpo_fraction)
        self.target_fpr = float(target_fpr)
        #: SVC kernel width: a float (relative to 1/d), or "auto" (:func:`choose_cluster_gamma` at fit time;
        #: the chosen float is saved in the cluster model's state)
        self.cluster_gamma: float | str = _cluster_gamma_param(cluster_gamma)
        self.cluster_nu = float(cluster_nu)
        self.cluster_k = int(cluster_k)
        #: at most this many pool embeddings are clustered (a seeded random subset; 0 = all). The model
        #: keeps them to name new anomalies, so this bounds its size for wide (flattened) embeddings.
        self.cluster_max_pool = int(cluster_max_pool)
        self.loss = str(loss)
        self.reducer_init = str(reducer_init)
        if hpo_objective not in HPO_OBJECTIVES:
            raise ValueError(f"unknown hpo_objective {hpo_objective!r}; choose one of {HPO_OBJECTIVES}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        if reducer_init not in REDUCER_INITS:
            raise ValueError(f"unknown reducer_init {reducer_init!r}; choose one of {REDUCER_INITS}")
        self.hpo_objective = str(hpo_objective)
        self.nu_max = float(nu_max)
        self.envelope_samples = int(envelope_samples)
        self.whiten = bool(whiten)
        if embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {embedding!r}; choose one of {EMBEDDINGS}")
        if int(flatten_grid) < 0:
            raise ValueError(f"flatten_grid must be >= 0 (0 = full resolution), got {flatten_grid}")
        #: "gap": global average pooling of h_T (the seed's default); "flatten": h_T flattened after
        #: average pooling to flatten_grid x flatten_grid (0: at full resolution)
        self.embedding = str(embedding)
        self.flatten_grid = int(flatten_grid)
        if skip not in SKIPS:
            raise ValueError(f"unknown skip {skip!r}; choose one of {SKIPS}")
        self.skip = str(skip)
        self.device = str(device)
        #: z-score (shift, scale) of the embedding, fitted on the training normals where skip != "none"
        self._embed_shift: torch.Tensor | None = None
        self._embed_scale: torch.Tensor | None = None

        self.encoder: ConvRecurrentEncoder | None = None
        self.boundary: SVDDBoundary | None = None
        self._torch_boundary: TorchRBFBoundary | None = None
        self.clusters: ClusterModel | None = None
        self.center: np.ndarray | None = None
        self._threshold: float | None = None
        self.fit_report: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ parameters
    def get_params(self) -> dict[str, Any]:
        keys = ("input_size", "clip_limit", "tile_grid", "cell", "layers", "hidden_channels",
                "reduce_channels", "epochs", "lr", "batch_size", "weight_decay", "momentum", "optimizer",
                "oe_weight", "synthetic_per_normal", "gamma", "nu", "hpo_trials", "hpo_fraction",
                "target_fpr", "cluster_gamma", "cluster_nu", "cluster_k", "cluster_max_pool", "loss", "reducer_init", "hpo_objective",
                "nu_max", "envelope_samples", "whiten", "embedding", "flatten_grid", "skip", "device")
        return {k: getattr(self, k) for k in keys}

    def portable_params(self) -> dict[str, Any]:
        """:meth:`get_params` as a model folder stores them: ``device`` is always ``cpu``, since where a
        model was trained says nothing about where it will run (a folder written on a GPU loads anywhere)."""
        return {**self.get_params(), "device": "cpu"}

    @property
    def threshold(self) -> float:
        if self._threshold is None:
            raise RuntimeError("MedGRU-SVC is not fitted")
        return self._threshold

    def to(self, device: str) -> "MedGRUSVC":
        """Move the detector (encoder, differentiable boundary, backbone use) to a torch device."""
        self.device = str(device)
        if self.encoder is not None:
            self.encoder.to(self.device)
        if self._torch_boundary is not None:
            self._torch_boundary.to(self.device)
        if self._embed_shift is not None and self._embed_scale is not None:
            self._embed_shift = self._embed_shift.to(self.device)
            self._embed_scale = self._embed_scale.to(self.device)
        return self

    @property
    def embedding_grid(self) -> int:
        """The grid of :func:`inference.convgru.embed_hidden`: 1 for GAP, else ``flatten_grid``."""
        return 1 if self.embedding == "gap" else self.flatten_grid

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        """``h_T`` ``(B, C, H, W)`` -> its part of the embedding (differentiable)."""
        return embed_hidden(h, self.embedding_grid)

    @property
    def embedding_dim(self) -> int:
        """Width of the embedding (for ``flatten_grid=0``, the h_T part counts one position per channel:
        the real width depends on the map size)."""
        d = self.hidden_channels * max(self.embedding_grid, 1) ** 2
        if self.skip == "reduced":
            d += self.reduce_channels or FEATURE_CHANNELS
        return d

    def embed_sequence(self, enc: nn.Module, x: torch.Tensor, *, skip_leaf: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backbone maps ``(B, T, C, h, w)`` -> (embeddings ``(B, d)``, the skip block's source).

        The embedding is :meth:`embed` of ``h_T``, followed for ``skip="reduced"`` by the GAP over frames
        and positions of the reduced frames, then z-scored (once fitted). ``skip_leaf`` makes the skip
        block's source ``(B, T, C_r, h, w)`` a separate leaf so that Grad-CAM can read the score's gradient
        through the skip alone (the recurrence still sees the reduced frames with their graph)."""
        if self.skip == "none":
            return self.embed(enc(x)), None
        h, reduced = enc(x, with_inputs=True)
        src = reduced.detach().requires_grad_(True) if skip_leaf else reduced
        return self._zscored(torch.cat([self.embed(h), src.mean(dim=(1, 3, 4))], dim=1)), src

    def _zscored(self, e: torch.Tensor) -> torch.Tensor:
        """``e`` z-scored with the fitted shift and scale (unchanged before they are fitted)."""
        if self._embed_shift is None or self._embed_scale is None:
            return e
        return (e - self._embed_shift) / self._embed_scale

    def _new_encoder(self) -> ConvRecurrentEncoder:
        return ConvRecurrentEncoder(FEATURE_CHANNELS, hidden_channels=self.hidden_channels, layers=self.layers,
                                    reduce_channels=self.reduce_channels, cell=self.cell)

    # ------------------------------------------------------------------------------- features
    #: the grey-level depth CLAHE runs at, at most: the depth of the images the models are trained on
    #: (``medgru train`` reads 8-bit image files). OpenCV's CLAHE on a 12-16-bit frame (a 65536-bin
    #: histogram, clip limit relative to it) enhances differently from the 8-bit CLAHE the encoder and the
    #: boundary were fitted after: the Kermany test images as 12-bit DICOM with a full-range window (the
    #: same frames to 0.03 grey levels) changed 259 of the bundled chest model's 624 verdicts that way
    #: (``benchmarks/results/serving_consistency.md``). So deeper
    #: frames (already windowed by the loader) are quantised to this depth first, as an 8-bit export of the
    #: displayed image would be.
    clahe_bits: int = 8

    def preprocess(self, seq: FrameSequence) -> np.ndarray:
        return preprocess_frames(seq.frames, bits_stored=min(int(seq.bits_stored), self.clahe_bits),
                                 size=self.input_size, clip_limit=self.clip_limit, tile_grid=self.tile_grid)

    def frame_features(self, frames: np.ndarray) -> torch.Tensor:
        """Preprocessed frames ``(N, S, S)`` -> backbone maps ``(N, C, h, w)`` (no grad)."""
        x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))[:, None].to(self.device)
        return extract_feature_maps(x, load_backbone(self.device))

    def sequence_features(self, seq: FrameSequence) -> torch.Tensor:
        """``(T, C, h, w)`` backbone maps of one sequence."""
        return self.frame_features(self.preprocess(seq))

    # -------------------------------------------------------------------------------- training
    def fit(self, normals: Sequence[FrameSequence], *, validation: Sequence[FrameSequence] = (),
            seed: int = 0, cluster_pool: Sequence[FrameSequence] = (),
            augment: Callable[[Sequence[FrameSequence]], Sequence[FrameSequence]] | None = None) -> None:
        """Train on ``normals``; ``validation`` normals calibrate the threshold (if empty, a share of the
        normals is held out for it). A share ``hpo_fraction`` of the normals is held out for the optuna
        objective; synthetic anomalies (:mod:`inference.synthetic`) are made from the normals.
        ``cluster_pool`` (optional, unlabelled) is what support-vector clustering names; by default the
        held-out synthetic anomalies. ``augment`` (optional) makes extra sequences from the training share
        once the HPO and calibration shares are set aside (``medgru train --reframe-copies``: re-framed
        copies); they join the ConvGRU's and the SVDD's training set only."""
        rng = np.random.default_rng(seed)
        normals = list(normals)
        n = len(normals)
        if n < 4:
            raise ValueError(f"MedGRU-SVC needs at least 4 normal sequences, got {n}")
        order = rng.permutation(n)
        calibration = list(validation)
        if not calibration:
            n_cal = max(2, int(round(0.2 * n)))
            calibration = [normals[i] for i in order[:n_cal]]
            order = order[n_cal:]
        n_hpo = max(2, int(round(self.hpo_fraction * len(order))))
        hpo = [normals[i] for i in order[:n_hpo]]
        train = [normals[i] for i in order[n_hpo:]]
        if len(train) < 2:
            train = hpo
        extra = list(augment(train)) if augment is not None else []
        feats = self._stack([self.sequence_features(s) for s in train + extra])
        if self.loss in RECONSTRUCT_LOSSES or self.oe_weight <= 0:  # no outlier exposure: no synthetic training set
            syn = torch.zeros((0,) + tuple(feats.shape[1:]))
        else:
            syn = self._stack([self.sequence_features(s) for s in self.synthetic_sequences(train, rng)])
        hpo_n = self._stack([self.sequence_features(s) for s in hpo])
        hpo_s = self._stack([self.sequence_features(s) for s in self.synthetic_sequences(hpo, rng)])
        cal = self._stack([self.sequence_features(s) for s in calibration])
        pool = self._stack([self.sequence_features(s) for s in cluster_pool]) if cluster_pool else None
        self.fit_features(feats, syn, hpo_n, hpo_s, cal, seed=seed, cluster_pool=pool)

    def synthetic_sequences(self, sequences: Sequence[FrameSequence], rng: np.random.Generator
                            ) -> list[FrameSequence]:
        """``synthetic_per_normal`` synthetic anomalies per sequence (perturbing its last frame)."""
        from inference.synthetic import synthesize

        out = []
        for _ in range(max(1, self.synthetic_per_normal)):
            for seq in sequences:
                frames = seq.frames.copy()
                frames[-1], _, _ = synthesize(frames[-1], rng)
                out.append(FrameSequence(frames=frames, modality=seq.modality, body_part=seq.body_part,
                                         bits_stored=seq.bits_stored))
        return out

    @staticmethod
    def _stack(feats: list[torch.Tensor]) -> torch.Tensor:
        """Per-sequence maps ``(T_i, C, h, w)`` -> ``(N, T, C, h, w)``, keeping the last ``min T_i``."""
        t = min(f.shape[0] for f in feats)
        return torch.stack([f[-t:] for f in feats])

    def fit_features(self, train: torch.Tensor, train_syn: torch.Tensor, hpo_normal: torch.Tensor,
                     hpo_syn: torch.Tensor, calibration: torch.Tensor, *, seed: int = 0,
                     cluster_pool: torch.Tensor | None = None,
                     progress: Callable[[Any], Any] | None = None,
                     checkpoint: Path | None = None) -> dict[str, Any]:
        """Fit from cached backbone maps, each ``(N, T, C, h, w)``.

        ``train``: normals for the ConvGRU and the SVDD; ``train_syn``: synthetic anomalies for outlier
        exposure; ``hpo_normal`` / ``hpo_syn``: held-out normals and synthetic anomalies made from them
        for the optuna objective; ``calibration``: held-out normals for the conformal threshold;
        ``cluster_pool``: embeddings to cluster (default ``hpo_syn``).
        """
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        report: dict[str, Any] = {}
        self.encoder = self._new_encoder().to(self.device)
        fingerprint = self.training_fingerprint(train, train_syn, seed) if checkpoint is not None else ""
        self._train_encoder(train, train_syn, rng, progress=progress, checkpoint=checkpoint, report=report,
                            fingerprint=fingerprint)

        self._embed_shift = self._embed_scale = None
        e_train = self.embed_features(train)
        if self.skip != "none":  # z-score the concatenated blocks on the training normals
            shift, scale = embedding_zscore(e_train)
            self._embed_shift = torch.from_numpy(shift).float().to(self.device)
            self._embed_scale = torch.from_numpy(scale).float().to(self.device)
            # the same float32 arithmetic as embed_sequence, without a second pass of the encoder
            e_train = self._zscored(torch.from_numpy(e_train).float().to(self.device)).cpu().double().numpy()
        e_hn, e_hs = self.embed_features(hpo_normal), self.embed_features(hpo_syn)
        self._tune_boundary(e_train, e_hn, e_hs, seed=seed, report=report)
        self.boundary = SVDDBoundary(gamma=self.gamma, nu=self.nu, whiten=self.whiten).fit(e_train)
        self._torch_boundary = TorchRBFBoundary(self.boundary).to(self.device)
        if len(e_hs):  # a sanity check when the objective is label-free
            report["hpo_auroc_normal_vs_synthetic"] = _auroc(self.boundary.score(e_hn), self.boundary.score(e_hs))
        report["heldout_normal_rejection"] = float((self.boundary.score(e_hn) > 0).mean())

        # each calibration frame alone, as a series' frames are judged (Detector.series_threshold)
        cal = self.boundary.score(self.embed_features(calibration.reshape(-1, 1, *calibration.shape[2:])))
        self.calibrate(cal, self.target_fpr)
        report["calibration_normals"] = int(cal.size)
        report["threshold"] = self._threshold

        pool = e_hs if cluster_pool is None else self.embed_features(cluster_pool)
        self._fit_clusters(pool, report, seed=seed)
        self.fit_report = report
        return report

    def training_fingerprint(self, train: torch.Tensor, train_syn: torch.Tensor, seed: int) -> str:
        """What an encoder checkpoint must match to be resumed: the parameters that shape the encoder's
        training, the seed, and the bytes of the training maps (a stale checkpoint of other data or
        another configuration is never resumed, even where the shapes agree)."""
        h = hashlib.sha256()
        params = {k: v for k, v in self.get_params().items() if k in ENCODER_TRAINING_PARAMS}
        h.update(json.dumps({"format": CHECKPOINT_FORMAT, "params": params, "seed": int(seed),
                             "shapes": [list(train.shape), list(train_syn.shape)],
                             "dtypes": [str(train.dtype), str(train_syn.dtype)]},
                            sort_keys=True, default=str).encode())
        for t in (train, train_syn):
            for i in range(0, t.shape[0], 256):  # in slices: no copy of the whole set
                h.update(np.ascontiguousarray(t[i:i + 256].detach().cpu().numpy()).data)
        return h.hexdigest()

    def _resumable_state(self, checkpoint: Path, fingerprint: str) -> dict[str, Any] | None:
        """The checkpoint's state if it belongs to this training run, else ``None`` (logged: the run then
        starts afresh and overwrites it)."""
        try:
            st = torch.load(checkpoint, map_location=self.device, weights_only=True)
        except Exception as exc:  # truncated, corrupt, or not a checkpoint at all: it is only a cache
            log.warning("encoder checkpoint %s is unreadable (%s: %s); training starts afresh",
                        checkpoint.name, type(exc).__name__, exc)
            return None
        if not isinstance(st, dict) or st.get("fingerprint") != fingerprint:
            log.warning("encoder checkpoint %s belongs to another training run (other data, seed or "
                        "parameters); training starts afresh", checkpoint.name)
            return None
        if not 0 <= int(st["epoch"]) <= self.epochs:
            log.warning("encoder checkpoint %s is at epoch %s of %d; training starts afresh",
                        checkpoint.name, st["epoch"], self.epochs)
            return None
        return st

    @staticmethod
    def _save_checkpoint(state: dict[str, Any], checkpoint: Path) -> None:
        """Write ``state`` next to ``checkpoint`` and rename it into place: an interruption while
        writing leaves the previous epoch's checkpoint whole."""
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_name(f".{checkpoint.name}.{os.getpid()}.partial")
        try:
            torch.save(state, tmp)
            os.replace(tmp, checkpoint)
        finally:
            tmp.unlink(missing_ok=True)

    def _train_encoder(self, train: torch.Tensor, train_syn: torch.Tensor, rng: np.random.Generator, *,
                       progress, checkpoint: Path | None, report: dict[str, Any],
                       fingerprint: str = "") -> None:
        """Train the encoder (and the reconstruction objective's decoder) for ``self.epochs`` epochs.

        With a ``checkpoint`` path the whole training state (weights, optimizer, centre, both random
        generators, the epoch) is saved there after every epoch; a later call with the same
        ``fingerprint`` (:meth:`training_fingerprint`) continues from it and ends with the weights an
        uninterrupted run would have had."""
        enc = self.encoder
        assert enc is not None
        recon = self.loss in RECONSTRUCT_LOSSES
        decoder: nn.Module | None = None
        whiten_target: tuple[torch.Tensor, torch.Tensor] | None = None
        if recon:
            decoder = nn.Conv2d(self.hidden_channels, train.shape[2], kernel_size=1).to(self.device)
            with torch.no_grad():  # per-channel standardisation of the target (fit normals' last frames)
                x = train[:, -1].float()
                t_mean = x.mean(dim=(0, 2, 3)).to(self.device)[None, :, None, None]
                t_std = (x.std(dim=(0, 2, 3)) + 1e-3).to(self.device)[None, :, None, None]
                del x
            if self.loss == "reconstruct-whitened":  # target: the map in whitened principal coordinates
                mean, comps, sd = feature_pca(train)
                whiten_target = (mean.to(self.device)[None, :, None, None],
                                 (comps / sd[:, None]).to(self.device)[:, :, None, None])
        params = [p for p in enc.parameters() if p.requires_grad]
        if decoder is not None:
            params += list(decoder.parameters())
        if self.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                                         weight_decay=self.weight_decay)
        elif self.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, betas=(self.momentum, 0.999),
                                   weight_decay=self.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {self.optimizer!r} (adam or sgd)")
        if self.reducer_init in ("pca", "pca-mix"):
            self._pca_init_reducer(train, mix=self.reducer_init == "pca-mix")
        elif self.reducer_init != "random":
            raise ValueError(f"unknown reducer_init {self.reducer_init!r}; choose one of {REDUCER_INITS}")
        start_epoch = 0
        with torch.no_grad():  # Deep SVDD centre: mean initial h_T embedding of the normals
            c = torch.from_numpy(self.embed_features(train, hidden_only=True)).float().mean(0).to(self.device)
            c[(c.abs() < 0.01) & (c < 0)] = -0.01
            c[(c.abs() < 0.01) & (c >= 0)] = 0.01
        st = None
        history: list[float] = []  # mean loss per epoch, the resumed run's earlier epochs included
        if checkpoint is not None and Path(checkpoint).is_file():
            st = self._resumable_state(Path(checkpoint), fingerprint)
        if st is not None:
            enc.load_state_dict(st["encoder"])
            if decoder is not None and "decoder" in st:
                decoder.load_state_dict(st["decoder"])
            opt.load_state_dict(st["optimizer"])
            c = st["center"].to(self.device)
            start_epoch = int(st["epoch"])
            history = [float(v) for v in st.get("history", [])]
            torch.set_rng_state(st["torch_rng"])
            rng.bit_generator.state = st["np_rng"]
            report["resumed_from_epoch"] = start_epoch
        self.center = c.cpu().numpy()
        n, m = train.shape[0], train_syn.shape[0]
        bs = max(1, self.batch_size)
        epochs = range(start_epoch, self.epochs)

        def run_epochs(cancel: threading.Event) -> None:
            bar = progress(epochs) if progress else epochs
            for epoch in bar:
                if cancel.is_set():
                    return
                enc.train()
                perm = rng.permutation(n)
                perm_s = rng.permutation(m) if m else perm[:0]
                tot, steps = 0.0, 0
                for i in range(0, n, bs):
                    if cancel.is_set():  # the checkpoint keeps the last whole epoch
                        return
                    idx = perm[i:i + bs]
                    xb = train[idx].to(self.device).float()
                    if recon:
                        assert decoder is not None
                        if whiten_target is None:
                            target = (xb[:, -1] - t_mean) / t_std
                        else:
                            target = F.conv2d(xb[:, -1] - whiten_target[0], whiten_target[1])
                        loss = ((decoder(enc(xb)) - target) ** 2).mean()
                    else:
                        loss = self._compactness_loss(enc, xb, train_syn, perm_s, i, c)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    tot += float(loss.detach())
                    steps += 1
                history.append(tot / max(steps, 1))
                if progress and hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{history[-1]:.4f}")
                if checkpoint is not None:
                    self._save_checkpoint({
                        "fingerprint": fingerprint, "encoder": enc.state_dict(), "optimizer": opt.state_dict(),
                        "center": c.cpu(), **({"decoder": decoder.state_dict()} if decoder is not None else {}),
                        "epoch": epoch + 1, "torch_rng": torch.get_rng_state(), "np_rng": rng.bit_generator.state,
                        "history": list(history),
                    }, Path(checkpoint))

        run_denormals_flushed(run_epochs)  # weight decay leaves denormals, which a CPU computes slowly
        enc.eval()
        report["loss_history"] = [round(v, 6) for v in history]
        if recon:
            report["encoder_objective"] = ("reconstruct the standardised backbone map of the last frame from "
                                           "h_T through a 1x1 decoder (MSE), normals only")

    def _compactness_loss(self, enc: nn.Module, xb: torch.Tensor, train_syn: torch.Tensor,
                          perm_s: np.ndarray, i: int, c: torch.Tensor) -> torch.Tensor:
        """Deep SAD / hypersphere-classifier loss of one batch: normals pulled towards ``c``, the
        matching outlier-exposure batch (``train_syn`` in the epoch's order ``perm_s``) pushed away."""
        hsc = self.loss == "hsc"
        dn = ((self.embed(enc(xb)) - c) ** 2).sum(1)
        if hsc:  # hypersphere classifier (Ruff et al. 2021): pseudo-Huber distance, BCE
            dn = torch.sqrt(dn + 1.0) - 1.0
        loss = dn.mean()
        m = train_syn.shape[0]
        if m and self.oe_weight > 0:
            sidx = perm_s[np.arange(i, i + xb.shape[0]) % m]
            xs = train_syn[sidx].to(self.device).float()
            da = ((self.embed(enc(xs)) - c) ** 2).sum(1)
            if hsc:
                da = torch.sqrt(da + 1.0) - 1.0
                la = -torch.log(-torch.expm1(-da.clamp_min(1e-6)))
            else:
                la = 1.0 / (da + 1e-6)
            loss = loss + self.oe_weight * la.mean()
        return loss

    @torch.no_grad()
    def _pca_init_reducer(self, train: torch.Tensor, *, mix: bool = False) -> None:
        """Start the 1x1 reducer as whitened PCA of the normals' feature vectors, both signs
        (``[P; -P]`` before the ReLU keeps the information of ``reduce_channels / 2`` directions).

        ``mix=False``: ``P`` holds the leading principal components. ``mix=True``: ``P`` is the first rows of
        a random rotation (fixed seed) of *all* whitened components, so each direction of the features is
        kept in equal measure (the leading components alone drop what separates anomalies on brain MRI:
        ``benchmarks/results/medgru-v8.md``)."""
        enc = self.encoder
        conv = enc.reducer[0] if isinstance(enc.reducer, nn.Sequential) else None
        if conv is None:
            return
        mean, v, sd = feature_pca(train)
        k = conv.out_channels // 2
        if mix:
            g = torch.Generator().manual_seed(1)
            q, _ = torch.linalg.qr(torch.randn(v.shape[0], v.shape[0], generator=g, dtype=v.dtype))
            comps = q[:k] @ (v / sd[:, None])
        else:
            comps = v[:k] / sd[:k, None]
        w = torch.cat([comps, -comps], 0)
        if w.shape[0] < conv.out_channels:
            w = torch.cat([w, torch.zeros(conv.out_channels - w.shape[0], w.shape[1])], 0)
        conv.weight.copy_(w[:, :, None, None].to(conv.weight))
        conv.bias.copy_((-(w @ mean)).to(conv.bias))

    def gaussian_envelope(self, e_train: np.ndarray, n: int, seed: int) -> np.ndarray:
        """``n`` samples of the Gaussian with the training embeddings' mean and (Ledoit-Wolf shrunk)
        covariance: the maximum-entropy distribution with the data's first two moments, used as the
        reference volume of Tax & Duin's error (a uniform box is hopeless in tens of dimensions)."""
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf().fit(e_train)
        return np.random.default_rng(seed).multivariate_normal(e_train.mean(0), lw.covariance_, size=n)

    def _tune_boundary(self, e_train: np.ndarray, e_hn: np.ndarray, e_hs: np.ndarray, *, seed: int,
                       report: dict[str, Any]) -> None:
        if self.hpo_trials <= 0 or len(e_hn) < 2:
            return
        likelihood = self.hpo_objective == "heldout-likelihood"
        label_free = self.hpo_objective in ("tax-duin", "consistent-volume")
        consistent = self.hpo_objective == "consistent-volume"
        if not (label_free or likelihood) and len(e_hs) < 2:
            return
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        envelope = self.gaussian_envelope(e_train, self.envelope_samples, seed) if label_free else None
        parts: dict[int, dict[str, float]] = {}
        g_range = LIKELIHOOD_GAMMA_RANGE if likelihood else GAMMA_RANGE

        def objective(trial: "optuna.Trial") -> float:
            g = trial.suggest_float("gamma", *g_range, log=True)
            nu = trial.suggest_float("nu", 0.01, self.nu_max, log=True)
            try:
                b = SVDDBoundary(gamma=g, nu=nu, whiten=self.whiten).fit(e_train)
            except ValueError:
                return -1e12 if likelihood else (2.0 if label_free else 0.0)
            if likelihood:  # likelihood cross-validation on the held-out normals (label-free)
                ll = float(np.mean(b.log_density(e_hn)))
                parts[trial.number] = {"heldout_normal_rejection": float((b.score(e_hn) > 0).mean())}
                return ll
            if label_free:
                # Tax & Duin (2004): error = held-out normals rejected + volume (envelope share accepted)
                fpr = float((b.score(e_hn) > 0).mean())
                vol = float((b.score(envelope) <= 0).mean())
                parts[trial.number] = {"heldout_normal_rejection": fpr, "envelope_acceptance": vol}
                if consistent:  # Tax & Muller (2004): reject boundaries that over-fit the training normals
                    bound = consistency_bound(nu, len(e_hn))
                    parts[trial.number]["consistency_bound"] = bound
                    return vol if fpr <= bound else 1.0 + (fpr - bound)
                return fpr + vol
            return _auroc(b.score(e_hn), b.score(e_hs))

        study = optuna.create_study(direction="minimize" if label_free else "maximize",
                                    sampler=optuna.samplers.TPESampler(seed=seed))
        start_gamma = min(max(self.gamma, g_range[0]), g_range[1])  # the untuned start is the first trial
        study.enqueue_trial({"gamma": start_gamma, "nu": min(self.nu, self.nu_max)})
        study.optimize(objective, n_trials=self.hpo_trials)
        self.gamma = float(study.best_params["gamma"])
        self.nu = float(study.best_params["nu"])
        if likelihood:
            report["hpo"] = {"trials": self.hpo_trials, "best_mean_heldout_log_likelihood": float(study.best_value),
                             **parts.get(study.best_trial.number, {}), "gamma": self.gamma, "nu": self.nu,
                             "gamma_range": list(g_range), "nu_range": [0.01, self.nu_max],
                             "objective": "largest mean log-likelihood of the held-out normals under the "
                                          "boundary's kernel expansion read as a density (label-free)"}
        elif label_free:
            what = ("Tax & Muller consistency: smallest Gaussian-envelope share accepted with held-out normal "
                    "rejection <= nu + 2 sd (label-free)") if consistent else (
                "Tax & Duin: held-out normals rejected + Gaussian-envelope share accepted (label-free)")
            report["hpo"] = {"trials": self.hpo_trials, "best_error": float(study.best_value),
                             **parts.get(study.best_trial.number, {}), "gamma": self.gamma, "nu": self.nu,
                             "nu_range": [0.01, self.nu_max], "envelope_samples": self.envelope_samples,
                             "objective": what}
        else:
            report["hpo"] = {"trials": self.hpo_trials, "best_auroc_normal_vs_synthetic": float(study.best_value),
                             "gamma": self.gamma, "nu": self.nu,
                             "objective": "AUROC held-out normals vs synthetic"}

    def _fit_clusters(self, pool: np.ndarray, report: dict[str, Any], *, seed: int = 0) -> None:
        assert self.boundary is not None
        outside = pool[self.boundary.score(pool) > self.threshold] if len(pool) else pool
        if len(outside) < 2:
            outside = pool
        if len(outside) >= 2:
            info: dict[str, Any] = {"pool": int(len(outside))}
            if 0 < self.cluster_max_pool < len(outside):
                keep = np.sort(np.random.default_rng(seed).choice(len(outside), self.cluster_max_pool, replace=False))
                outside = outside[keep]
                info["subsampled_to"] = int(len(outside))
            if self.cluster_gamma == "auto":  # the choice's graph and sphere are reused, not rebuilt
                self.clusters, gamma, trace = auto_support_vector_clustering(
                    outside, nu=self.cluster_nu, k=self.cluster_k)
                info.update(gamma_choice="auto", trace=trace)
            else:
                gamma = float(self.cluster_gamma)
                info["gamma_choice"] = "fixed"
                self.clusters = support_vector_clustering(outside, gamma=gamma, nu=self.cluster_nu, k=self.cluster_k)
            info["gamma"] = float(gamma)
            info["sizes"] = {n: int((self.clusters.labels == i).sum()) for i, n in enumerate(self.clusters.names)}
            # (sizes count the clustered points: the subset where the pool was subsampled)
            report["clusters"] = info
        else:
            self.clusters = None

    # ------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def embed_features(self, feats: torch.Tensor, batch: int = 64, *, hidden_only: bool = False) -> np.ndarray:
        """Backbone maps ``(N, T, C, h, w)`` -> embeddings ``(N, d)`` (:meth:`embed_sequence`;
        ``hidden_only``: :meth:`embed` of ``h_T`` alone, the part the encoder's training objective sees)."""
        if self.encoder is None:
            raise RuntimeError("MedGRU-SVC is not fitted")
        enc = self.encoder
        enc.eval()
        out = []
        for i in range(0, feats.shape[0], batch):
            x = feats[i:i + batch].to(self.device).float()
            out.append((self.embed(enc(x)) if hidden_only else self.embed_sequence(enc, x)[0]).cpu())
        if out:
            return torch.cat(out).double().numpy()
        return np.zeros((0, self.hidden_channels * max(self.embedding_grid, 1) ** 2 if hidden_only
                         else self.embedding_dim))

    def score_features(self, feats: torch.Tensor) -> np.ndarray:
        """Scores of backbone maps ``(N, T, C, h, w)`` read as N sequences by the ConvGRU (the sequence
        score; for T = 1 the score of each image)."""
        assert self.boundary is not None
        return self.boundary.score(self.embed_features(feats))

    def series_score(self, feats: torch.Tensor, context_frames: int = 0) -> float:
        """The score :meth:`detect` gives a sequence with backbone maps ``feats`` ``(T, C, h, w)``: the
        highest score of a judged frame scored alone (for T = 1 the image's score)."""
        return self.series_decision(self.score_features(feats[:, None]), context_frames)[1]

    def score_batch(self, sequences: Sequence[FrameSequence]) -> np.ndarray:
        """Scores of ``sequences``, those :meth:`detect` gives. On the CPU one sequence at a time: grouping
        was slower there (2 cores: 0.8 x for single images, 0.5-0.7 x for T = 8 series,
        ``benchmarks/results/batch_scoring-*-cpu.json``; an earlier run 0.92-1.0 x and 0.6 x). On a GPU,
        where one image leaves the device idle between kernel launches, sequences of one length go through
        the backbone and the encoder together (:meth:`score_grouped`)."""
        if str(self.device).split(":")[0] != "cpu" and len(sequences) > 1:
            return self.score_grouped(sequences)
        out = np.empty(len(sequences), dtype=np.float64)
        for i, seq in enumerate(sequences):
            out[i] = self.series_score(self.sequence_features(seq), seq.context_frames)
        return out

    def score_grouped(self, sequences: Sequence[FrameSequence]) -> np.ndarray:
        """Scores of ``sequences``, those of one length T scored together: their preprocessed frames in one
        backbone call, their maps in batched encoder calls (each frame alone where T > 1, as
        :meth:`detect`). Equal to scoring one at a time up to float rounding; the order is kept."""
        out = np.empty(len(sequences), dtype=np.float64)
        pre = [self.preprocess(seq) for seq in sequences]  # (T, S, S) each
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(pre):
            by_length.setdefault(p.shape[0], []).append(i)
        for t, same in by_length.items():
            per_call = max(1, GROUPED_FRAMES_PER_CALL // t)  # bounds the backbone's activations on a small GPU
            for k in range(0, len(same), per_call):
                idx = same[k:k + per_call]
                maps = self.frame_features(np.concatenate([pre[i] for i in idx]))  # (n * T, C, h, w)
                frame_scores = self.score_features(maps[:, None]).reshape(len(idx), t)
                for j, i in enumerate(idx):
                    out[i] = self.series_decision(frame_scores[j], sequences[i].context_frames)[1]
        return out

    def _explain(self, feats: torch.Tensor, size: tuple[int, int]) -> tuple[float, np.ndarray, np.ndarray]:
        """Grad-CAM of the score of backbone maps ``feats`` ``(T, C, h, w)`` read as one sequence:
        ``(score, heat maps (T, H, W), the embedding (1, d))``."""
        enc, head = self.encoder, self._torch_boundary
        enc.eval()
        kept: list[tuple[torch.Tensor, torch.Tensor | None]] = []

        def forward_score() -> torch.Tensor:
            # gradients are needed for the hidden states only: the input carries the graph, the
            # weights don't (their gradients were half the backward pass, never used)
            e, src = self.embed_sequence(enc, feats[None].float().requires_grad_(True), skip_leaf=True)
            kept.append((e, src))
            return head(e)

        def skip_terms() -> list[tuple[torch.Tensor, torch.Tensor]] | None:
            src = kept[0][1]  # the skip block's own leaf: the score's gradient through the skip alone
            if src is None or src.grad is None:
                return None
            return [(src[:, i].detach(), src.grad[:, i]) for i in range(src.shape[1])]

        with _weights_frozen(enc):
            score, heat = grad_cam(enc.cells[-1], forward_score, size, extra=skip_terms)
        return score, heat, kept[0][0].detach().cpu().double().numpy()

    def detect(self, sequence: FrameSequence, *, explain: bool = True) -> Detection:
        """Score one sequence. T = 1: the image's score, with its Grad-CAM. T > 1: every frame scored
        alone (``frame_scores``); the series' score is the highest among the judged frames and its
        threshold :meth:`~inference.api.Detector.series_threshold` of their number (the models learn and
        calibrate on single images, so only that comparison holds the target false-positive rate). The heat
        map is the Grad-CAM of that frame scored alone, at its index (the other frames' maps are zero).
        The ConvGRU's score of all T frames as one sequence is kept in ``extras["sequence_score"]``, for
        reading only: its distribution at T > 1 was never calibrated."""
        if self.encoder is None or self.boundary is None or self._torch_boundary is None:
            raise RuntimeError("MedGRU-SVC is not fitted")
        feats = self.sequence_features(sequence)  # (T, C, h, w)
        t, h, w = sequence.frames.shape
        frame_scores: tuple[float, ...] = ()
        extras: dict[str, float] = {}
        if t == 1:
            if explain:
                score, heat, emb = self._explain(feats, (h, w))
            else:
                emb = self.embed_features(feats[None])
                score = float(self.boundary.score(emb)[0])
                heat = np.zeros((t, h, w), dtype=np.float32)
            thr = self.threshold
        else:
            frame_emb = self.embed_features(feats[:, None])
            per_frame = self.boundary.score(frame_emb)
            frame_scores = tuple(float(v) for v in per_frame)
            top, score, thr = self.series_decision(per_frame, sequence.context_frames)
            emb = frame_emb[top:top + 1]
            heat = np.zeros((t, h, w), dtype=np.float32)
            if explain:
                heat[top] = self._explain(feats[top:top + 1], (h, w))[1][0]
            extras["sequence_score"] = float(self.score_features(feats[None])[0])
            extras.update(self.series_extras(len(sequence.judged)))
        extras["svdd_decision"] = float(self.boundary.decision(emb)[0])
        anomalous = bool(score > thr)
        label = None
        if anomalous and self.clusters is not None:
            label = self.clusters.predict(emb)[0]
        card = self.card
        return Detection(
            score=float(score), threshold=thr, is_anomaly=anomalous, heatmaps=heat,
            model_name=card.name if card else "medgru-svc (unsaved)",
            model_version=card.version if card else "0",
            cluster_label=label, frame_scores=frame_scores, extras=extras,
        )

    # ----------------------------------------------------------------------------- persistence
    def save(self, model_dir: Path) -> list[str]:
        if self.encoder is None or self.boundary is None:
            raise RuntimeError("MedGRU-SVC is not fitted")
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()}
        torch.save(sd, model_dir / ENCODER_FILE)
        arrays: dict[str, np.ndarray] = {f"svdd_{k}": np.asarray(v) for k, v in self.boundary.state().items()}
        if self.clusters is not None:
            arrays.update({f"svc_{k}": np.asarray(v) for k, v in self.clusters.state().items()})
        arrays["center"] = np.asarray(self.center if self.center is not None else [])
        if self._embed_shift is not None and self._embed_scale is not None:
            arrays["embed_shift"] = self._embed_shift.cpu().numpy()
            arrays["embed_scale"] = self._embed_scale.cpu().numpy()
        arrays["threshold"] = np.array([self.threshold])
        np.savez_compressed(model_dir / HEAD_FILE, **arrays)
        meta = {"params": self.portable_params(), "fit_report": self.fit_report}
        (model_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=float) + "\n")
        return [ENCODER_FILE, HEAD_FILE, META_FILE]

    @classmethod
    def load(cls, model_dir: Path, card: ModelCard) -> "MedGRUSVC":
        model_dir = Path(model_dir)
        meta = json.loads((model_dir / META_FILE).read_text()) if (model_dir / META_FILE).is_file() else {}
        params = dict(card.params) or dict(meta.get("params", {}))
        if card.params and "params" in meta:  # the card is not checksummed; meta.json is, and the weights fit it
            # each with the constructor's defaults filled in: a folder written before a param existed lacks it
            # in the card, while medgru calibrate's save_model writes it into meta.json (the same value)
            ours, saved = (json.loads(json.dumps(cls(**{**dict(p), "device": "cpu"}).portable_params(),
                                                 sort_keys=True)) for p in (card.params, meta["params"]))
            differ = sorted(k for k in (set(ours) | set(saved)) - {"device"} if ours.get(k) != saved.get(k))
            if differ:
                raise ValueError(f"model {card.name}: the card's params differ from {META_FILE}'s, which the "
                                 f"weights were saved with, in {', '.join(differ)}; a model folder's card is not "
                                 "edited by hand (retrain, or medgru calibrate for the threshold)")
        det = cls(**{**params, "device": "cpu"})  # loaded on the CPU; callers move it with .to()
        det.encoder = det._new_encoder()
        sd = torch.load(model_dir / ENCODER_FILE, map_location="cpu", weights_only=True)
        det.encoder.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
        flush_denormal_weights_(det.encoder)
        det.encoder.to(det.device).eval()
        with np.load(model_dir / HEAD_FILE) as z:
            arrays = {k: z[k] for k in z.files}
        det.boundary = SVDDBoundary.from_state({k[5:]: v for k, v in arrays.items() if k.startswith("svdd_")})
        det._torch_boundary = TorchRBFBoundary(det.boundary).to(det.device)
        svc = {k[4:]: v for k, v in arrays.items() if k.startswith("svc_")}
        det.clusters = ClusterModel.from_state(svc) if svc else None
        det.center = arrays["center"]
        if "embed_shift" in arrays:
            det._embed_shift = torch.from_numpy(arrays["embed_shift"]).float().to(det.device)
            det._embed_scale = torch.from_numpy(arrays["embed_scale"]).float().to(det.device)
        det._threshold = float(arrays["threshold"][0])
        if meta:
            det.fit_report = meta.get("fit_report", {})
        det.card = card
        return det
