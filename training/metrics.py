"""Detection metrics as pure functions of scores and labels.

Conventions, used everywhere in this module:

* ``scores``: 1-D array, larger = more abnormal.
* ``labels``: 1-D array of 0/1 (or bool), 1 = anomaly (positive class), 0 = normal.
* A case is called abnormal when ``score > threshold`` (the same rule as :class:`inference.api.Detection`).
* ``classes``: 1-D array of class names (strings); :func:`is_normal_label` says which ones are normal.

No function here looks at anything but its arguments, so each can be checked against hand-computed
cases and against scikit-learn (``tests/training/test_metrics.py``).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

#: labels (lower case) of normal images, in manifests, image folder names and evaluation classes alike
NORMAL_LABELS = frozenset({"normal", "0", "notumor", "no_tumor", "healthy"})


def is_normal_label(label: object) -> bool:
    """``"normal"`` / ``"0"`` (any case, surrounding blanks ignored) and the synonyms ``"notumor"``,
    ``"no_tumor"``, ``"healthy"`` (:data:`NORMAL_LABELS`) are normal. The one rule of every command:
    :attr:`training.manifest.ManifestRow.is_normal` (train, calibrate) is this function."""
    return str(label).strip().lower() in NORMAL_LABELS


def binary_labels(classes: Iterable[object]) -> np.ndarray:
    """0 for normal class names, 1 for every other class."""
    return np.array([0 if is_normal_label(c) else 1 for c in classes], dtype=np.int64)


def _check(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    y = y.astype(np.int64)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomaly)")
    if y.sum() == 0 or y.sum() == y.size:
        raise ValueError(f"need both classes: {int((y == 0).sum())} normal, {int(y.sum())} anomaly")
    return s, y


# -------------------------------------------------------------------------------------- ranking metrics
def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve: P(score of a random anomaly > score of a random normal), ties count 1/2.

    Computed from mid-ranks (Mann-Whitney U), which is exact and O(n log n).
    """
    s, y = _check(scores, labels)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # mid-ranks for ties
    i = 0
    n = s.size
    while i < n:
        j = i
        while j + 1 < n and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    n_pos = int(y.sum())
    n_neg = n - n_pos
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_points(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve as ``(fpr, tpr, thresholds)``, one point per distinct score plus the origin.

    Point ``k`` is the rule ``score >= thresholds[k]``; the first point has threshold ``+inf`` (nothing
    called abnormal). Matches ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    # last index of each run of equal scores
    distinct = np.where(np.diff(s_sorted))[0]
    idx = np.r_[distinct, s.size - 1]
    tps = np.cumsum(y_sorted)[idx]
    fps = (idx + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (y.size - y.sum())]
    thr = np.r_[np.inf, s_sorted[idx]]
    return fpr, tpr, thr


def pr_points(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve ``(precision, recall, thresholds)`` for the rules ``score >= t``, ordered by
    decreasing threshold and starting at recall 0 with precision 1 (as plotted by scikit-learn)."""
    s, y = _check(scores, labels)
    _, tpr, thr = roc_points(s, y)
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    distinct = np.where(np.diff(s_sorted))[0]
    idx = np.r_[distinct, s.size - 1]
    tps = np.cumsum(y[order])[idx]
    precision = tps / (idx + 1)
    recall = tps / y.sum()
    return np.r_[1.0, precision], np.r_[0.0, recall], thr


def auprc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the precision-recall curve as average precision: ``sum_k (R_k - R_{k-1}) P_k``
    (the step-wise estimate of ``sklearn.metrics.average_precision_score``; no interpolation)."""
    precision, recall, _ = pr_points(scores, labels)
    return float(np.sum(np.diff(recall) * precision[1:]))


def sens_at_spec(scores: Sequence[float], labels: Sequence[int], specificity: float = 0.95) -> float:
    """Best sensitivity among thresholds whose specificity is at least ``specificity``."""
    fpr, tpr, _ = roc_points(scores, labels)
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max())


def fpr_at_sens(scores: Sequence[float], labels: Sequence[int], sensitivity: float = 0.95) -> float:
    """Lowest false-positive rate among thresholds whose sensitivity is at least ``sensitivity``."""
    fpr, tpr, _ = roc_points(scores, labels)
    ok = tpr >= sensitivity - 1e-12
    return float(fpr[ok].min())


# ----------------------------------------------------------------------------------- threshold metrics
Threshold = float | Sequence[float] | np.ndarray  # one for every case, or one per case


def _rule(scores: np.ndarray, threshold: Threshold) -> np.ndarray:
    """``score > threshold``, with one threshold for every case or one per case (a multi-frame case is
    judged against its series threshold)."""
    t = np.asarray(threshold, dtype=np.float64)
    if t.ndim and t.shape != scores.shape:
        raise ValueError(f"{t.size} thresholds for {scores.size} scores")
    return scores > t


def called_abnormal(scores: Sequence[float], threshold: Threshold) -> np.ndarray:
    """Which cases are called abnormal: ``score > threshold`` (one threshold, or one per case)."""
    return _rule(np.asarray(scores, dtype=np.float64).ravel(), threshold)


def confusion(scores: Sequence[float], labels: Sequence[int], threshold: Threshold) -> dict[str, int]:
    """Counts ``tp, fp, tn, fn`` for the rule ``score > threshold`` (one threshold, or one per case)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(np.int64)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    pred = _rule(s, threshold)
    pos = y == 1
    return {
        "tp": int(np.sum(pred & pos)),
        "fp": int(np.sum(pred & ~pos)),
        "tn": int(np.sum(~pred & ~pos)),
        "fn": int(np.sum(~pred & pos)),
    }


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def threshold_metrics(scores: Sequence[float], labels: Sequence[int], threshold: float, *,
                      row_thresholds: Sequence[float] | np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, precision, recall (= sensitivity), specificity, F1, balanced accuracy and the counts
    for the rule ``score > threshold``, or ``score > row_thresholds[i]`` case by case where given (the
    reported ``threshold`` stays the single-image one). A ratio with an empty denominator is NaN."""
    c = confusion(scores, labels, threshold if row_thresholds is None else row_thresholds)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    out: dict[str, float] = {
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "sensitivity": recall,
        "specificity": specificity,
        "f1": f1,
        "balanced_accuracy": (recall + specificity) / 2.0,
        "fpr": _ratio(fp, fp + tn),
    }
    out.update({k: int(v) for k, v in c.items()})
    return out


# ---------------------------------------------------------------------------------------- per class
def per_class_auroc(scores: Sequence[float], classes: Sequence[object]) -> dict[str, float]:
    """AUROC of each anomaly class against all normals (other anomaly classes left out)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    cls = np.asarray([str(c) for c in classes])
    if s.shape != cls.shape:
        raise ValueError(f"{s.size} scores for {cls.size} class names")
    normal = np.array([is_normal_label(c) for c in cls])
    if not normal.any():
        raise ValueError("no normal cases: per-class AUROC needs normals")
    out: dict[str, float] = {}
    for name in sorted(set(cls[~normal])):
        mask = normal | (cls == name)
        out[name] = auroc(s[mask], (~normal[mask]).astype(np.int64))
    return out


def class_detection_rates(scores: Sequence[float], classes: Sequence[object], threshold: Threshold
                          ) -> dict[str, float]:
    """Fraction of each class called abnormal (``score > threshold``, one threshold or one per case): the
    FPR for normal classes, the sensitivity for anomaly classes."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    cls = np.asarray([str(c) for c in classes])
    pred = _rule(s, threshold)
    return {name: float(np.mean(pred[cls == name])) for name in sorted(set(cls))}


# ---------------------------------------------------------------------------------------- uncertainty
def bootstrap_auroc_ci(scores: Sequence[float], labels: Sequence[int], *, n_boot: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUROC.

    Resampling is stratified (normals and anomalies resampled separately, with replacement), so every
    replicate has both classes and the class balance of the data.
    """
    s, y = _check(scores, labels)
    rng = np.random.default_rng(seed)
    pos = s[y == 1]
    neg = s[y == 0]
    stats = np.empty(n_boot, dtype=np.float64)
    lab = np.r_[np.ones(pos.size, dtype=np.int64), np.zeros(neg.size, dtype=np.int64)]
    for b in range(n_boot):
        p = pos[rng.integers(0, pos.size, pos.size)]
        n = neg[rng.integers(0, neg.size, neg.size)]
        stats[b] = _auroc_fast(np.r_[p, n], lab)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _auroc_fast(s: np.ndarray, y: np.ndarray) -> float:
    """AUROC with average ranks from scipy (same value as :func:`auroc`, faster for bootstrapping)."""
    from scipy.stats import rankdata

    ranks = rankdata(s)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ---------------------------------------------------------------------------------------- summary
def summarize(scores: Sequence[float], labels: Sequence[int], threshold: float, *,
              classes: Sequence[object] | None = None, n_boot: int = 1000, seed: int = 0,
              row_thresholds: Sequence[float] | np.ndarray | None = None) -> dict[str, object]:
    """All headline metrics in one JSON-ready dict (used by :mod:`training.report`). ``threshold`` is the
    single-image threshold; ``row_thresholds`` (optional, one per case) is what each case is judged against
    at the threshold: a series of T frames against the detector's ``series_threshold(T)``."""
    rule = threshold if row_thresholds is None else np.asarray(row_thresholds, dtype=np.float64)
    s, y = _check(scores, labels)
    lo, hi = bootstrap_auroc_ci(s, y, n_boot=n_boot, seed=seed) if n_boot > 0 else (float("nan"),) * 2
    out: dict[str, object] = {
        "auroc": auroc(s, y),
        "auroc_ci95": [lo, hi],
        "auprc": auprc(s, y),
        "auprc_chance": float(y.mean()),
        "sens_at_95_spec": sens_at_spec(s, y, 0.95),
        "fpr_at_95_sens": fpr_at_sens(s, y, 0.95),
        "threshold": float(threshold),
        "n_normal": int((y == 0).sum()),
        "n_anomaly": int(y.sum()),
        "at_threshold": threshold_metrics(s, y, threshold, row_thresholds=row_thresholds),
    }
    if classes is not None:
        out["per_class_auroc"] = per_class_auroc(s, classes)
        out["per_class_flagged_rate"] = class_detection_rates(s, classes, rule)
        out["n_per_class"] = {str(k): int(v) for k, v in zip(*np.unique(np.asarray([str(c) for c in classes]),
                                                                           return_counts=True))}
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) ignoring NaN."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def aggregate_folds(fold_metrics: Sequence[Mapping[str, object]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{key: {"mean": m, "std": s}}`` over folds for the scalar metrics named in ``keys``."""
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        vals = [float(m[k]) for m in fold_metrics if k in m and m[k] is not None]  # type: ignore[arg-type]
        mean, std = mean_std(vals)
        out[k] = {"mean": mean, "std": std, "n": len(vals)}
    return out
