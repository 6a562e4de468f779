"""One-class boundary (SVDD with an RBF kernel) and support-vector clustering of anomalies.

**Boundary.** With an RBF kernel ``K(x, x) = 1`` for every ``x``, the SVDD minimum enclosing hypersphere
in feature space and the ``nu``-one-class SVM (Schölkopf et al.) have the same dual and the same solution
(Tax & Duin 2004), so the boundary is fitted with :class:`sklearn.svm.OneClassSVM`. The squared distance
of a point's image from the sphere centre is ``R^2(x) = 1 - 2 f(x) + c``, with
``f(x) = sum_i alpha_i K(sv_i, x)``; it is outside the sphere exactly when ``f(x) < rho``. The anomaly
score is the (scaled) distance from the boundary, positive outside:

    score(x) = (rho - f(x)) / rho

so 0 is the boundary, negative values are inside, and the score grows monotonically with ``R^2(x)``.
That "ratio" form saturates at 1 far from the data (``f(x)`` underflows to 0: every out-of-domain input
scores exactly 1 and its gradient vanishes). New boundaries therefore use the **log-kernel** form
(``score_form="log"``, the default)

    score(x) = log rho - log f(x) = log rho - logsumexp_i( log alpha_i - gamma ||x - sv_i||^2 )

a strictly increasing function of the ratio form (``-log(1 - ratio)``), so the same boundary (0),
the same ordering and AUROC where ``f`` does not underflow; but it is unbounded, finite everywhere
(logsumexp never underflows) and grows like ``gamma * min_i ||x - sv_i||^2`` far away, so its
gradient never vanishes. Boundaries saved before keep the ratio form (``from_state``).
Embeddings are standardised (per-dimension mean / std of the training embeddings) before the kernel.

:class:`TorchRBFBoundary` evaluates the same function in torch from the fitted support vectors and dual
coefficients, so that the score is differentiable (Grad-CAM) and runs on the inference device.

**Support-vector clustering** (Ben-Hur et al. 2001): fit an SVDD to a pool of anomalous embeddings with a
larger ``gamma``; the sphere's pre-image splits into contours, one per cluster. Two points are in the
same cluster when the segment between them stays inside the sphere. The all-pairs segment test is
O(n^2); here the test is applied only to the edges of the k-nearest-neighbour graph (O(n k)), and the
clusters are the connected components of the kept edges (the "k-NN labelling" of SVC). Bounded support
vectors and points in components smaller than ``min_cluster_size`` are attached to the nearest
clustered point. Clusters are named ``cluster-1``, ``cluster-2``, ... by decreasing size. A point is
inside the sphere when ``f(x)`` is at least the smallest ``f`` over the unbounded support vectors (they lie
on the sphere; testing against ``rho`` put about half of them outside through the solver's tolerance).
:func:`choose_cluster_gamma` picks the kernel width without labels: the number of clusters that persists
over the longest run of a geometric grid of gammas ("cluster lifetime").
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.neighbors import NearestNeighbors
from sklearn.svm import OneClassSVM


SCORE_FORMS = ("log", "ratio")
log = logging.getLogger(__name__)


#: at most this many rows are scored with one BLAS thread (see :func:`_blas_for`)
SMALL_BATCH_ROWS = 256
_blas_controller = None


def _blas_for(rows: int):
    """A context for numpy linear algebra on ``rows`` embeddings: one BLAS thread for small batches.

    Scoring one sequence multiplies a handful of rows by a d x d whitener (d = 1152 for a flattened
    embedding). OpenBLAS runs that on all its threads, which then spin-wait after the call and take the
    cores from torch's own threads: measured on 2 cores, the backbone of the next call took 1.7x as long
    (``benchmarks/results/medgru-v5.md``). One thread loses nothing on a matrix-vector product. Large
    batches (training) keep the library's default.
    """
    global _blas_controller
    if rows > SMALL_BATCH_ROWS:
        return contextlib.nullcontext()
    if _blas_controller is None:
        from threadpoolctl import ThreadpoolController

        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api="blas")


def _f32(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to float32 precision, as float64."""
    return np.asarray(a, np.float64).astype(np.float32).astype(np.float64)


def _compact(a: np.ndarray) -> np.ndarray:
    """``a`` as float32 where that loses nothing (it was rounded by :func:`_f32`), else unchanged: large
    arrays of new fits halve in size on disk while older models' float64 arrays are saved as they are."""
    a32 = np.asarray(a).astype(np.float32)
    return a32 if np.array_equal(a32.astype(np.float64), a) else np.asarray(a)


class SVDDBoundary:
    """RBF SVDD / one-class SVM on standardised embeddings; ``score`` > 0 outside the boundary."""

    def __init__(self, gamma: float = 1.0, nu: float = 0.1, gamma_is_relative: bool = True,
                 score_form: str = "log", whiten: bool = False):
        """``gamma_is_relative``: the kernel width is ``gamma / d`` for ``d``-dimensional standardised
        embeddings (so ``gamma = 1`` is sklearn's ``"scale"`` choice); otherwise ``gamma`` is absolute.
        ``score_form``: ``"log"`` (non-saturating, default) or ``"ratio"`` (legacy ``(rho - f) / rho``).
        ``whiten``: map embeddings through ``Sigma^{-1/2}`` of the training embeddings (Ledoit-Wolf shrunk
        covariance) instead of per-dimension standardisation, so the isotropic RBF kernel measures
        Mahalanobis distance: correlated embedding dimensions are not counted twice."""
        if score_form not in SCORE_FORMS:
            raise ValueError(f"unknown score_form {score_form!r}; choose one of {SCORE_FORMS}")
        self.gamma = float(gamma)
        self.nu = float(nu)
        self.gamma_is_relative = bool(gamma_is_relative)
        self.score_form = score_form
        self.whiten = bool(whiten)
        self.whitener_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.support_vectors_: np.ndarray | None = None
        self.dual_coef_: np.ndarray | None = None
        self.rho_: float | None = None
        self.kernel_gamma_: float | None = None

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        assert self.mean_ is not None and self.scale_ is not None
        if self.whitener_ is not None:
            return (np.asarray(x, dtype=np.float64) - self.mean_) @ self.whitener_
        return (np.asarray(x, dtype=np.float64) - self.mean_) / self.scale_

    def kernel_space(self, x: np.ndarray) -> np.ndarray:
        """Embeddings ``(N, d)`` in the space where the kernel is isotropic: whitened or standardised by
        the training embeddings' statistics, as :meth:`score` sees them."""
        if self.mean_ is None:
            raise RuntimeError("SVDDBoundary is not fitted")
        return self._standardise(np.atleast_2d(x))

    def fit(self, x: np.ndarray) -> "SVDDBoundary":
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"SVDD needs at least two embeddings (N, d), got {x.shape}")
        self.mean_ = x.mean(axis=0)
        self.scale_ = x.std(axis=0) + 1e-6
        self.whitener_ = None
        if self.whiten:
            from sklearn.covariance import LedoitWolf

            evals, evecs = np.linalg.eigh(LedoitWolf().fit(x).covariance_)
            w = (evecs / np.sqrt(np.maximum(evals, 1e-12))) @ evecs.T  # symmetric Sigma^{-1/2}
            # kept at float32 precision: a d x d matrix is most of a model folder's size for a flattened
            # embedding (d = 1152: 5 MB instead of 10), and the fitted model equals the saved one exactly
            self.whitener_ = _f32(w)
        xs = self._standardise(x)
        self.kernel_gamma_ = self.gamma / xs.shape[1] if self.gamma_is_relative else self.gamma
        svm = OneClassSVM(kernel="rbf", gamma=self.kernel_gamma_, nu=self.nu)
        svm.fit(xs)
        self.support_vectors_ = np.asarray(svm.support_vectors_, dtype=np.float64)
        self.dual_coef_ = np.asarray(svm.dual_coef_, dtype=np.float64).ravel()
        self.rho_ = float(-svm.intercept_[0])
        if self.rho_ <= 0:
            raise ValueError(f"degenerate SVDD fit (rho = {self.rho_}); try another gamma / nu")
        return self

    def _log_terms(self, x: np.ndarray, batch: int = 4096):
        """Yield ``(slice, log alpha_i - gamma ||x - sv_i||^2)`` per batch of standardised ``x``."""
        if self.support_vectors_ is None:
            raise RuntimeError("SVDDBoundary is not fitted")
        xs = self._standardise(np.atleast_2d(x))
        sv = self.support_vectors_
        sv2 = (sv ** 2).sum(1)
        log_a = np.log(np.maximum(self.dual_coef_, np.finfo(np.float64).tiny))
        for i in range(0, xs.shape[0], batch):
            xb = xs[i:i + batch]
            d2 = np.maximum((xb ** 2).sum(1)[:, None] + sv2[None, :] - 2.0 * xb @ sv.T, 0.0)
            yield slice(i, i + xb.shape[0]), log_a[None, :] - self.kernel_gamma_ * d2

    def decision(self, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        """``f(x) = sum_i alpha_i K(sv_i, x)`` for embeddings ``x`` (N, d)."""
        out = np.empty(np.atleast_2d(x).shape[0])
        with _blas_for(out.size):
            for sl, t in self._log_terms(x, batch):
                out[sl] = np.exp(t).sum(1)
        return out

    def log_decision(self, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        """``log f(x)`` by logsumexp (finite even where ``f(x)`` underflows to 0)."""
        from scipy.special import logsumexp

        out = np.empty(np.atleast_2d(x).shape[0])
        with _blas_for(out.size):
            for sl, t in self._log_terms(x, batch):
                out[sl] = logsumexp(t, axis=1)
        return out

    def log_density(self, x: np.ndarray, batch: int = 4096, *, embedding_space: bool = False) -> np.ndarray:
        """The kernel expansion as a probability density in the standardised (or whitened) space:
        ``log sum_i b_i N(x; sv_i, I / (2 gamma))`` with ``b = alpha / sum(alpha)``, i.e.
        ``log f(x) - log sum(alpha) + (d / 2) log(gamma / pi)``. It differs from ``-score(x)`` by a
        constant of the fit, so it ranks alike; unlike the score it can be compared across ``gamma`` and
        ``nu`` (held-out log-likelihood, :meth:`inference.detectors.medgru_svc.MedGRUSVC._tune_boundary`).

        ``embedding_space``: the density of the embeddings themselves, i.e. plus ``log |det|`` of the
        standardising map (whitening or per-dimension scaling), so that a whitened and a standardised
        kernel can be compared too."""
        if self.support_vectors_ is None:
            raise RuntimeError("SVDDBoundary is not fitted")
        d = self.support_vectors_.shape[1]
        out = (self.log_decision(x, batch) - math.log(float(self.dual_coef_.sum()))
               + 0.5 * d * math.log(self.kernel_gamma_ / math.pi))
        if embedding_space:
            if self.whitener_ is not None:
                out = out + float(np.linalg.slogdet(np.asarray(self.whitener_, dtype=np.float64))[1])
            else:
                out = out - float(np.log(self.scale_).sum())
        return out

    def score(self, x: np.ndarray) -> np.ndarray:
        """Signed distance from the boundary, positive outside: ``log rho - log f(x)`` (``"log"`` form)
        or the legacy ``(rho - f(x)) / rho`` (``"ratio"`` form)."""
        if self.score_form == "ratio":
            return (self.rho_ - self.decision(x)) / self.rho_
        return math.log(self.rho_) - self.log_decision(x)

    def squared_radius(self, x: np.ndarray) -> np.ndarray:
        """``R^2(x) = 1 - 2 sum_i b_i K(sv_i, x) + sum_ij b_i b_j K(sv_i, sv_j)`` with ``b = alpha / sum(alpha)``:
        the squared feature-space distance from the SVDD centre."""
        s = self.dual_coef_.sum()
        b = self.dual_coef_ / s
        sv = self.support_vectors_
        d2 = np.maximum((sv ** 2).sum(1)[:, None] + (sv ** 2).sum(1)[None] - 2 * sv @ sv.T, 0.0)
        const = float(b @ np.exp(-self.kernel_gamma_ * d2) @ b)
        return 1.0 - 2.0 * self.decision(x) / s + const

    # --------------------------------------------------------------------------- persistence
    def state(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean_, "scale": self.scale_, "support_vectors": self.support_vectors_,
            "dual_coef": self.dual_coef_, "rho": np.array([self.rho_]),
            "kernel_gamma": np.array([self.kernel_gamma_]),
            "hyper": np.array([self.gamma, self.nu, float(self.gamma_is_relative)]),
            "score_form": np.array([SCORE_FORMS.index(self.score_form)]),
            **({"whitener": _compact(self.whitener_)} if self.whitener_ is not None else {}),
        }

    @classmethod
    def from_state(cls, st: dict[str, np.ndarray]) -> "SVDDBoundary":
        g, nu, rel = (float(v) for v in st["hyper"])
        # boundaries saved before the log form existed carry no "score_form": they keep the ratio form
        form = SCORE_FORMS[int(np.asarray(st["score_form"]).ravel()[0])] if "score_form" in st else "ratio"
        b = cls(gamma=g, nu=nu, gamma_is_relative=bool(rel), score_form=form, whiten="whitener" in st)
        if "whitener" in st:
            b.whitener_ = np.asarray(st["whitener"], np.float64)
        b.mean_, b.scale_ = np.asarray(st["mean"], np.float64), np.asarray(st["scale"], np.float64)
        b.support_vectors_ = np.asarray(st["support_vectors"], np.float64)
        b.dual_coef_ = np.asarray(st["dual_coef"], np.float64)
        b.rho_ = float(st["rho"][0])
        b.kernel_gamma_ = float(st["kernel_gamma"][0])
        return b


class TorchRBFBoundary(torch.nn.Module):
    """The boundary's score in torch (differentiable): ``log rho - logsumexp_i(log alpha_i - g d_i^2)``
    (log form) or ``(rho - sum_i alpha_i exp(-g d_i^2)) / rho`` (ratio form)."""

    def __init__(self, boundary: SVDDBoundary):
        super().__init__()
        if boundary.support_vectors_ is None:
            raise RuntimeError("boundary is not fitted")
        f32 = torch.float32
        self.register_buffer("mean", torch.tensor(boundary.mean_, dtype=f32))
        self.register_buffer("scale", torch.tensor(boundary.scale_, dtype=f32))
        self.whitened = boundary.whitener_ is not None
        if self.whitened:
            self.register_buffer("whitener", torch.tensor(boundary.whitener_, dtype=f32))
        self.register_buffer("sv", torch.tensor(boundary.support_vectors_, dtype=f32))
        self.register_buffer("alpha", torch.tensor(boundary.dual_coef_, dtype=f32))
        self.register_buffer("log_alpha", torch.log(torch.tensor(
            np.maximum(boundary.dual_coef_, np.finfo(np.float64).tiny), dtype=torch.float64)).to(f32))
        self.rho = float(boundary.rho_)
        self.gamma = float(boundary.kernel_gamma_)
        self.score_form = boundary.score_form

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        xs = (e - self.mean) @ self.whitener if self.whitened else (e - self.mean) / self.scale
        d2 = (xs.pow(2).sum(1, keepdim=True) + self.sv.pow(2).sum(1)[None] - 2.0 * xs @ self.sv.T).clamp_min(0)
        if self.score_form == "ratio":
            f = torch.exp(-self.gamma * d2) @ self.alpha
            return (self.rho - f) / self.rho
        return math.log(self.rho) - torch.logsumexp(self.log_alpha[None] - self.gamma * d2, dim=1)


# ------------------------------------------------------------------------------ clustering
@dataclass
class ClusterModel:
    """Result of :func:`support_vector_clustering`: the clustered points and their names."""

    points: np.ndarray  # standardised embeddings that carry a label
    labels: np.ndarray  # int cluster index per point (0-based, by decreasing size)
    mean: np.ndarray
    scale: np.ndarray
    gamma: float

    @property
    def names(self) -> list[str]:
        return [f"cluster-{i + 1}" for i in range(int(self.labels.max()) + 1)] if self.labels.size else []

    def predict(self, x: np.ndarray) -> list[str]:
        """Name of the cluster of the nearest clustered point for each embedding."""
        if self.labels.size == 0:
            return [None] * len(np.atleast_2d(x))  # type: ignore[list-item]
        xs = (np.atleast_2d(np.asarray(x, np.float64)) - self.mean) / self.scale
        with _blas_for(xs.shape[0]):  # brute force: no tree to build per call
            d2 = (xs ** 2).sum(1)[:, None] + (self.points ** 2).sum(1)[None, :] - 2.0 * xs @ self.points.T
        idx = np.argmin(d2, axis=1)
        return [f"cluster-{int(self.labels[i]) + 1}" for i in idx]

    def state(self) -> dict[str, np.ndarray]:
        return {"points": _compact(self.points), "labels": self.labels, "mean": self.mean, "scale": self.scale,
                "gamma": np.array([self.gamma])}

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> "ClusterModel":
        return cls(points=np.asarray(st["points"], np.float64), labels=np.asarray(st["labels"], np.int64),
                   mean=np.asarray(st["mean"], np.float64), scale=np.asarray(st["scale"], np.float64),
                   gamma=float(np.asarray(st["gamma"]).ravel()[0]))


#: default kernel widths searched by :func:`choose_cluster_gamma` (relative to ``1/d``): 0.25 ... 64
DEFAULT_CLUSTER_GAMMAS: tuple[float, ...] = tuple(float(g) for g in np.geomspace(0.25, 64.0, 12))


def default_min_cluster_size(n: int) -> int:
    """Smallest component that counts as a cluster in a pool of ``n`` points: ``max(5, ceil(2 % of n))``."""
    return max(5, int(math.ceil(0.02 * n)))


@dataclass
class _KNNGraph:
    """The k-nearest-neighbour edges of a pool (independent of the kernel width)."""

    x: np.ndarray  # raw embeddings (N, d)
    xs: np.ndarray  # standardised embeddings
    mean: np.ndarray
    scale: np.ndarray
    src: np.ndarray  # edge sources, N * k
    dst: np.ndarray  # edge targets


def _knn_graph(x: np.ndarray, k: int) -> _KNNGraph:
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    mean, scale = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / scale
    kk = max(1, min(k, n - 1))
    idx = NearestNeighbors(n_neighbors=kk + 1).fit(xs).kneighbors(xs, return_distance=False)
    # drop each point itself (duplicates may put it anywhere in its row, not necessarily first)
    nbr = np.array([[j for j in row if j != i][:kk] for i, row in enumerate(idx)], dtype=np.int64)
    return _KNNGraph(x=x, xs=xs, mean=mean, scale=scale, src=np.repeat(np.arange(n), kk), dst=nbr.ravel())


@dataclass
class _SVCComponents:
    comp: np.ndarray  # connected-component id per point (points outside the sphere are singletons)
    inside: np.ndarray  # bool per point: inside the sphere (not a bounded support vector / outlier)
    kernel_gamma: float


def _svc_components(g: _KNNGraph, *, gamma: float, nu: float, segment_points: int,
                    gamma_is_relative: bool) -> _SVCComponents:
    """Fit the sphere at one kernel width and keep the k-NN edges whose segment stays inside it.

    "Inside" is ``f(x) >= level`` with ``level`` the smallest ``f`` over the unbounded support vectors,
    which lie *on* the sphere by definition (Ben-Hur et al.: ``R = R(x_sv)`` for any unbounded SV).
    Comparing with ``rho`` itself instead puts about half of them outside through the solver's
    tolerance (libsvm stops at a 1e-3 gradient violation); at large ``gamma`` nearly every point is an
    unbounded SV, so that test dropped about half the points from the graph and shattered it.
    """
    n, d = g.xs.shape
    kg = gamma / d if gamma_is_relative else gamma
    sphere = SVDDBoundary(gamma=gamma, nu=nu, gamma_is_relative=gamma_is_relative)
    sphere.mean_, sphere.scale_ = g.mean, g.scale
    sphere.kernel_gamma_ = kg
    svm = OneClassSVM(kernel="rbf", gamma=kg, nu=nu).fit(g.xs)
    sphere.support_vectors_ = np.asarray(svm.support_vectors_, np.float64)
    sphere.dual_coef_ = np.asarray(svm.dual_coef_, np.float64).ravel()
    sphere.rho_ = float(-svm.intercept_[0])
    # libsvm's one-class dual: 0 <= alpha_i <= 1 (sum = nu n); alpha_i = 1: bounded SV (outside)
    free = sphere.dual_coef_ < 1.0 - 1e-8
    level = sphere.rho_
    if free.any():
        level = min(level, float(sphere.decision(sphere.support_vectors_[free] * g.scale + g.mean).min()))
    level -= 1e-9 * abs(level)
    inside = sphere.decision(g.x) >= level
    ok = inside[g.src] & inside[g.dst]
    cand = np.flatnonzero(ok)
    # interior sample points of each edge, the middle first (the most likely to leave the sphere)
    ts = np.linspace(0.0, 1.0, segment_points + 2)[1:-1]
    for t in ts[np.argsort(np.abs(ts - 0.5), kind="stable")]:
        if cand.size == 0:
            break
        seg = (1 - t) * g.x[g.src[cand]] + t * g.x[g.dst[cand]]
        keep = sphere.decision(seg) >= level
        ok[cand[~keep]] = False
        cand = cand[keep]
    graph = coo_matrix((np.ones(int(ok.sum())), (g.src[ok], g.dst[ok])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    return _SVCComponents(comp=comp, inside=inside, kernel_gamma=kg)


def _big_components(comp: np.ndarray, min_cluster_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the components with at least ``min_cluster_size`` points, by decreasing size, and all sizes."""
    sizes = np.bincount(comp)
    big = np.flatnonzero(sizes >= max(1, min_cluster_size))
    return big[np.argsort(-sizes[big], kind="stable")], sizes


def support_vector_clustering(x: np.ndarray, *, gamma: float = 1.0, nu: float = 0.1, k: int = 10,
                              segment_points: int = 8, min_cluster_size: int | None = None,
                              gamma_is_relative: bool = True) -> ClusterModel:
    """Cluster embeddings ``x`` (N, d) by SVC with k-NN-graph labelling (O(N k) segment tests).

    ``gamma`` sets the kernel width (relative to ``1/d`` of the standardised data by default): larger
    values give more, tighter clusters (:func:`choose_cluster_gamma` picks one without labels). ``nu``
    bounds the fraction of bounded support vectors (outliers). Components smaller than
    ``min_cluster_size`` (default :func:`default_min_cluster_size`) and points outside the sphere join
    the cluster of their nearest clustered point; clusters are then named by decreasing size. If no
    component is that large (the sphere's pre-image has shattered: ``gamma`` too large) the largest one
    is the only cluster.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        mean, scale = x.mean(0) if n else np.zeros(x.shape[1:]), np.ones(x.shape[1:])
        return ClusterModel(points=(x - mean) / scale, labels=np.zeros(n, np.int64), mean=mean,
                            scale=scale, gamma=float(gamma))
    g = _knn_graph(x, k)
    parts = _svc_components(g, gamma=gamma, nu=nu, segment_points=segment_points,
                            gamma_is_relative=gamma_is_relative)
    m = default_min_cluster_size(n) if min_cluster_size is None else int(min_cluster_size)
    return _cluster_model(g, parts, m, gamma)


def _cluster_model(g: _KNNGraph, parts: _SVCComponents, m: int, gamma: float) -> ClusterModel:
    """Name the components of at least ``m`` points by decreasing size; the rest join their nearest."""
    order, sizes = _big_components(parts.comp, m)
    if order.size == 0:
        log.warning("SVC at gamma=%g: no component of >= %d points (largest %d): one cluster", gamma, m,
                    int(sizes.max()))
        order = np.array([int(np.argmax(sizes))])
    remap = np.full(sizes.size, -1, np.int64)
    remap[order] = np.arange(order.size)
    labels = remap[parts.comp]
    labelled = np.flatnonzero(labels >= 0)
    orphans = np.flatnonzero(labels < 0)
    if orphans.size:
        nn1 = NearestNeighbors(n_neighbors=1).fit(g.xs[labelled])
        j = nn1.kneighbors(g.xs[orphans], return_distance=False)[:, 0]
        labels[orphans] = labels[labelled[j]]
    rank = np.empty(order.size, np.int64)  # name by decreasing size after the orphans joined
    rank[np.argsort(-np.bincount(labels, minlength=order.size), kind="stable")] = np.arange(order.size)
    # points at float32 precision (saved as float32: they are only looked up by nearest neighbour)
    return ClusterModel(points=_f32(g.xs), labels=rank[labels], mean=g.mean, scale=g.scale, gamma=float(gamma))


def choose_cluster_gamma(x: np.ndarray, *, gammas: Sequence[float] | None = None, nu: float = 0.1,
                         k: int = 10, segment_points: int = 8, min_cluster_size: int | None = None,
                         max_clusters: int = 8, min_lifetime: int = 2, min_coverage: float = 0.5,
                         gamma_is_relative: bool = True) -> tuple[float, dict[str, Any]]:
    """Label-free choice of the SVC kernel width (see :func:`_choose_cluster_gamma`): ``(gamma, trace)``."""
    gamma, trace, _, _ = _choose_cluster_gamma(
        x, gammas=gammas, nu=nu, k=k, segment_points=segment_points, min_cluster_size=min_cluster_size,
        max_clusters=max_clusters, min_lifetime=min_lifetime, min_coverage=min_coverage,
        gamma_is_relative=gamma_is_relative)
    return gamma, trace


def auto_support_vector_clustering(x: np.ndarray, *, nu: float = 0.1, k: int = 10, segment_points: int = 8,
                                   **choice: Any) -> tuple[ClusterModel, float, dict[str, Any]]:
    """:func:`choose_cluster_gamma`, then :func:`support_vector_clustering` at the chosen width, reusing
    the k-NN graph and that width's sphere from the choice instead of building them again.
    Returns ``(model, gamma, trace)``; the model equals ``support_vector_clustering(x, gamma=gamma, ...)``."""
    gamma, trace, g, parts = _choose_cluster_gamma(x, nu=nu, k=k, segment_points=segment_points, **choice)
    m = trace["min_cluster_size"]
    if g is None:  # the pool was too small to search: nothing to reuse
        model = support_vector_clustering(x, gamma=gamma, nu=nu, k=k, segment_points=segment_points,
                                          min_cluster_size=m,
                                          gamma_is_relative=choice.get("gamma_is_relative", True))
        return model, gamma, trace
    return _cluster_model(g, parts[gamma], m, gamma), gamma, trace


def _choose_cluster_gamma(x: np.ndarray, *, gammas: Sequence[float] | None = None, nu: float = 0.1,
                          k: int = 10, segment_points: int = 8, min_cluster_size: int | None = None,
                          max_clusters: int = 8, min_lifetime: int = 2, min_coverage: float = 0.5,
                          gamma_is_relative: bool = True
                          ) -> tuple[float, dict[str, Any], _KNNGraph | None, dict[float, _SVCComponents]]:
    """Label-free choice of the SVC kernel width by cluster lifetime.

    For each ``gamma`` of an increasing grid (default :data:`DEFAULT_CLUSTER_GAMMAS`) count the clusters:
    components of the SVC k-NN labelling with at least ``min_cluster_size`` points (default
    :func:`default_min_cluster_size`). Where those components hold less than ``min_coverage`` of the
    points inside the sphere, the sphere's pre-image has shattered (most points would be labelled by
    their nearest neighbour, not by SVC): that gamma counts as 0 clusters, "fragmented". (The bounded
    support vectors, a share of about ``nu``, are outliers by design and do not count against the
    coverage.) The number of clusters ``K`` with
    ``2 <= K <= max_clusters`` that persists over the longest run of consecutive gammas, at least
    ``min_lifetime`` of them, is taken (ties: the run at the smaller gammas), and the smallest gamma of
    that run is returned. A ``K`` seen at a single gamma has no measured lifetime (on the brain MRI
    tumours it was the giant component breaking up, ``benchmarks/results/clustering-brain_mri.md``), so
    the default asks for two. If no such ``K`` appears, the smallest gamma giving one cluster is
    returned (or the smallest gamma if none does), and the trace says so.

    Returns ``(gamma, trace, graph, components per gamma)`` (graph ``None`` when the pool was too small to
    search); ``trace`` is JSON-serialisable: the grid, per gamma the cluster count,
    the sizes of the components of at least ``min_cluster_size``, their coverage and the share of points
    outside the sphere, the chosen ``K``, its lifetime and a sentence on how the choice was made.
    """
    x = np.asarray(x, dtype=np.float64)
    grid = sorted(float(v) for v in (DEFAULT_CLUSTER_GAMMAS if gammas is None else gammas))
    if not grid:
        raise ValueError("choose_cluster_gamma needs at least one gamma")
    n = x.shape[0]
    m = default_min_cluster_size(n) if min_cluster_size is None else int(min_cluster_size)
    trace: dict[str, Any] = {"gammas": grid, "nu": float(nu), "k": int(k), "min_cluster_size": m,
                             "max_clusters": int(max_clusters), "min_lifetime": int(min_lifetime),
                             "min_coverage": float(min_coverage), "n": int(n), "per_gamma": []}
    if n < 2 * m:  # two clusters cannot both be large enough
        trace.update(gamma=grid[0], clusters=1, lifetime=0,
                     reason=f"pool of {n} points < 2 x min_cluster_size ({m}): one cluster, smallest gamma")
        return grid[0], trace, None, {}
    g = _knn_graph(x, k)
    counts = []
    by_gamma: dict[float, _SVCComponents] = {}
    for gamma in grid:
        parts = by_gamma[gamma] = _svc_components(g, gamma=gamma, nu=nu, segment_points=segment_points,
                                                  gamma_is_relative=gamma_is_relative)
        order, sizes = _big_components(parts.comp, m)
        coverage = float(sizes[order].sum()) / max(1, int(parts.inside.sum()))
        fragmented = order.size > 0 and coverage < min_coverage
        counts.append(0 if fragmented else int(order.size))
        trace["per_gamma"].append({"gamma": gamma, "clusters": counts[-1], "components": int(order.size),
                                   "sizes": [int(sizes[c]) for c in order], "coverage": round(coverage, 4),
                                   "fragmented": bool(fragmented or order.size == 0),
                                   "outside_fraction": round(float(1.0 - parts.inside.mean()), 4)})
    trace["counts"] = counts
    best: tuple[int, int, int] | None = None  # (lifetime, start index, K)
    i = 0
    while i < len(counts):
        j = i
        while j + 1 < len(counts) and counts[j + 1] == counts[i]:
            j += 1
        life = j - i + 1
        if 2 <= counts[i] <= max_clusters and life >= min_lifetime and (best is None or life > best[0]):
            best = (life, i, counts[i])
        i = j + 1
    if best is not None:
        life, start, kk = best
        chosen = grid[start]
        trace.update(gamma=chosen, clusters=kk, lifetime=life,
                     reason=f"K={kk} clusters persist over {life} consecutive gammas "
                            f"({grid[start]:.3g}..{grid[start + life - 1]:.3g}); smallest gamma of that run")
        return chosen, trace, g, by_gamma
    ones = [gm for gm, c in zip(grid, counts) if c == 1]
    chosen = ones[0] if ones else grid[0]
    runs_of_one = "".join("1" if c == 1 else "." for c in counts).split(".")
    trace.update(gamma=chosen, clusters=1, lifetime=max(len(r) for r in runs_of_one),
                 reason=(f"no K in 2..{max_clusters} clusters of >= {m} points persisted over >= {min_lifetime} "
                         "consecutive gammas: one cluster, "
                         + ("smallest gamma giving one" if ones else "no gamma gave one either; smallest gamma")))
    return chosen, trace, g, by_gamma
