"""A lesion-blind reference for an evaluation: how far does image style alone get on the same test split?

A benchmark's classes can differ in how their images were made as much as in what they show: on Kermany
the train normals are framed alike and sharper than the pneumonia images, and on the brain MRI set the
classes come from different source collections (``benchmarks/results/style_audit.md``). An anomaly score
that reads that style looks good without finding a lesion. So ``medgru evaluate`` reports, beside the
model, the test AUROC of a **style baseline**: a logistic regression on eight per-image statistics that
see no lesion, fitted on the manifest's TRAIN split (normals against anomalies, the train labels). It is
a supervised reference, not a detector, and nothing is chosen by it.

The statistics (:data:`STATS`), of a grey frame in [0, 1]:

* ``mean``, ``std``, ``p99.5``: the grey levels;
* ``foreground``: share of pixels above 0.05 (how much of the frame the body fills);
* ``background noise``: standard deviation of the pixels at or below 0.05;
* ``sharpness``: mean absolute high-pass residual (the frame minus its Gaussian blur, sigma 1 px);
* ``blockiness``: mean absolute step across the 8 x 8 JPEG block boundaries over the mean step inside
  the blocks (a trace of the JPEG history);
* ``framing``: 1 - correlation of the 56 x 56 thumbnail with the train normals' mean thumbnail.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

#: framing comes last: it is measured against a template, after the others
STATS = ("mean", "std", "p99.5", "foreground", "background noise", "sharpness", "blockiness", "framing")
FOREGROUND = 0.05
THUMB = 56
#: fewest train images of each class the style baseline is fitted on
MIN_PER_CLASS = 5


def thumbnail(frame: np.ndarray) -> np.ndarray:
    """The frame's 56 x 56 thumbnail (area interpolation), flattened, mean-free and of unit norm."""
    import cv2

    t = cv2.resize(np.asarray(frame, np.float32), (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
    t = t - t.mean()
    n = np.linalg.norm(t)
    return t / n if n > 0 else t


def thumbnail_template(frames: Iterable[np.ndarray]) -> np.ndarray:
    """Unit-norm mean of the mean-free, unit-norm 56 x 56 thumbnails of ``frames``."""
    return thumbnail_template_of(np.stack([thumbnail(f) for f in frames]))


def _lesion_blind(f: np.ndarray) -> dict[str, float]:
    """Every statistic of :data:`STATS` but ``framing``."""
    import cv2

    fg = f > FOREGROUND
    dx = np.abs(np.diff(f, axis=1))
    at_edge = (np.arange(dx.shape[1]) % 8) == 7  # the step from column 8k+7 to 8k+8 crosses a block edge
    inside = float(dx[:, ~at_edge].mean()) if (~at_edge).any() else 0.0
    edge = float(dx[:, at_edge].mean()) if at_edge.any() else 0.0
    return {"mean": float(f.mean()), "std": float(f.std()), "p99.5": float(np.percentile(f, 99.5)),
            "foreground": float(fg.mean()), "background noise": float(f[~fg].std()) if (~fg).any() else 0.0,
            "sharpness": float(np.abs(f - cv2.GaussianBlur(f, (0, 0), 1.0)).mean()),
            "blockiness": edge / inside if inside > 0 else 1.0}


def style_statistics(frame: np.ndarray, template: np.ndarray | None) -> dict[str, float]:
    """The statistics of :data:`STATS` of one grey frame in [0, 1]; ``framing`` needs the unit-norm
    ``template`` of :func:`thumbnail_template` (NaN without). Blockiness is 1.0 for a frame without any
    step inside its blocks (a constant frame), as for one without block edges."""
    f = np.asarray(frame, np.float32)
    out = _lesion_blind(f)
    out["framing"] = float(1.0 - thumbnail(f) @ template) if template is not None else float("nan")
    return out


def _without_framing(frames: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(N, len(STATS) - 1)`` statistics but framing, and the ``(N, 56 * 56)`` thumbnails framing is
    measured on, of ``frames`` (any iterable: one frame is held at a time)."""
    rows, thumbs = [], []
    for frame in frames:
        f = np.asarray(frame, np.float32)
        st = _lesion_blind(f)
        rows.append([st[k] for k in STATS[:-1]])
        thumbs.append(thumbnail(f))
    if not rows:
        return np.zeros((0, len(STATS) - 1)), np.zeros((0, THUMB * THUMB), np.float32)
    return np.array(rows, dtype=np.float64), np.stack(thumbs)


def _with_framing(partial: np.ndarray, thumbs: np.ndarray, template: np.ndarray) -> np.ndarray:
    """The full ``(N, len(STATS))`` matrix: ``partial`` with the framing column against ``template``."""
    return np.column_stack([partial, 1.0 - thumbs @ template])


def statistics_matrix(frames: Iterable[np.ndarray], template: np.ndarray) -> np.ndarray:
    """``(N, len(STATS))`` statistics of ``frames`` (any iterable: one frame is held at a time), framing
    against the unit-norm ``template`` of :func:`thumbnail_template`."""
    return _with_framing(*_without_framing(frames), template)


def thumbnail_template_of(thumbs: np.ndarray) -> np.ndarray:
    """:func:`thumbnail_template` from thumbnails already made (``(N, 56 * 56)``, each unit-norm)."""
    t = np.asarray(thumbs).mean(axis=0)
    n = np.linalg.norm(t)
    return t / n if n > 0 else t


def _classifier():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def fit_style_classifier(x: np.ndarray, y: np.ndarray):
    """A standardised logistic regression of ``y`` (1 = anomaly) on the statistics ``x``."""
    return _classifier().fit(x, y)


def cross_validated_style(x: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Out-of-fold logits of the style classifier (5-fold stratified CV over these images)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    return cross_val_predict(_classifier(), x, y, cv=cv, method="decision_function")


def style_baseline(train_frames: Iterable[np.ndarray], train_normal: Sequence[bool],
                   eval_frames: Iterable[np.ndarray], eval_normal: Sequence[bool]) -> dict[str, Any]:
    """The style baseline of the module docstring: fitted on the train frames (an iterable, one frame held
    at a time), its AUROC on the evaluation frames; framing is measured against the train normals' mean
    thumbnail. Where the train split holds fewer than :data:`MIN_PER_CLASS` images of a class, ``auroc``
    is None and ``skipped`` says why (the frames are then not read)."""
    from training.metrics import auroc

    tn = np.asarray(train_normal, dtype=bool)
    en = np.asarray(eval_normal, dtype=bool)
    out: dict[str, Any] = {"statistics": list(STATS), "n_train_normal": int(tn.sum()),
                           "n_train_anomaly": int((~tn).sum()), "auroc": None}
    if tn.sum() < MIN_PER_CLASS or (~tn).sum() < MIN_PER_CLASS:
        out["skipped"] = (f"the train split holds {int(tn.sum())} normal and {int((~tn).sum())} anomaly "
                          f"images; the style baseline needs at least {MIN_PER_CLASS} of each")
        return out
    partial, thumbs = _without_framing(train_frames)
    if len(thumbs) != len(tn):
        raise ValueError(f"{len(thumbs)} train frames for {len(tn)} labels")
    template = thumbnail_template_of(thumbs[tn])
    x = _with_framing(partial, thumbs, template)
    clf = fit_style_classifier(x, (~tn).astype(int))
    logit = clf.decision_function(statistics_matrix(eval_frames, template))
    out["auroc"] = float(auroc(logit, (~en).astype(int)))
    return out
