"""The evaluation report: ``metrics.json``, ``report.md`` and its PNG plots, in one folder.

:func:`write_report` takes an :class:`EvaluationResult` (scores, class names, threshold, timings,
Grad-CAM gallery items, optional cross-validation folds) and writes:

* ``metrics.json``: headline metrics (``auroc``, ``auroc_ci95``, ``auprc``, ``sens_at_95_spec``,
  ``fpr_at_95_sens``, ``threshold``, ``n_normal``, ``n_anomaly``, ``per_class_auroc``, the metrics at the
  threshold: ``accuracy``, ``precision``, ``recall``, ``sensitivity``, ``specificity``, ``f1`` ...), timing
  (``inference_seconds_per_image``), model, dataset, command line, date, and ``cv`` when folds are given;
* ``scores.csv``: one row per evaluated image (name, class, score, verdict);
* ``roc.png``, ``pr.png``, ``score_hist.png``, ``confusion.png``, ``gradcam_gallery.png``;
* ``report.md``: all of the above as tables with the plots embedded.

Plots are drawn with matplotlib's object API on an Agg canvas (no pyplot global state, no display).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from training import metrics as M
from training.environment import software_environment

GALLERY_KINDS = (
    ("true_positive", "True positives (highest-scoring anomalies)"),
    ("false_positive", "False positives (highest-scoring normals above the threshold)"),
    ("false_negative", "False negatives (lowest-scoring anomalies below the threshold)"),
)
CV_KEYS = ("auroc", "auprc", "sens_at_95_spec", "fpr_at_95_sens", "sensitivity", "specificity", "f1",
           "accuracy", "threshold")


@dataclass
class GalleryItem:
    """One image of the Grad-CAM gallery: the frame, its heat map (both ``(H, W)`` in [0, 1])."""

    kind: str  # one of GALLERY_KINDS' keys
    name: str
    label: str
    score: float
    image: np.ndarray
    heatmap: np.ndarray


@dataclass
class EvaluationResult:
    """Everything a report is made of."""

    scores: np.ndarray
    classes: Sequence[str]
    names: Sequence[str]
    threshold: float
    model: Mapping[str, Any]  # name, version, detector, path
    dataset: str
    command: str
    seconds_per_image: float  # score_batch wall time / images
    timing: Mapping[str, Any] = field(default_factory=dict)
    gallery: Sequence[GalleryItem] = ()
    cv_folds: Sequence[Mapping[str, Any]] = ()
    cv_settings: Mapping[str, Any] = field(default_factory=dict)
    notes: Sequence[str] = ()
    date: str = ""
    #: ``training.style.style_baseline`` on the same evaluation rows, or None when not computed
    style_baseline: Mapping[str, Any] | None = None
    #: per row: the frames its verdict judges, and the threshold it is judged against (the detector's
    #: ``series_threshold`` of that number; the single-image ``threshold`` for one frame). Empty: every row
    #: is one frame, judged against ``threshold``
    row_frames: Sequence[int] = ()
    row_thresholds: Sequence[float] = ()


# ------------------------------------------------------------------------------------------- metrics
def _row_rule(result: EvaluationResult) -> np.ndarray | None:
    """Each row's threshold where rows carry their own (multi-frame rows: their series threshold), else
    ``None``: every row against ``result.threshold``."""
    return np.asarray(result.row_thresholds, dtype=np.float64) if len(result.row_thresholds) else None


def compute_metrics(result: EvaluationResult, *, n_boot: int = 1000) -> dict[str, Any]:
    scores = np.asarray(result.scores, dtype=np.float64)
    labels = M.binary_labels(result.classes)
    frames = np.asarray(result.row_frames, dtype=np.int64)
    row_thr = _row_rule(result)
    if frames.size != (0 if row_thr is None else row_thr.size) or (frames.size and frames.shape != scores.shape):
        raise ValueError(f"{frames.size} row frame counts and {len(result.row_thresholds)} row thresholds for "
                         f"{scores.size} scores")
    out: dict[str, Any] = M.summarize(scores, labels, result.threshold, classes=list(result.classes),
                                      n_boot=n_boot, row_thresholds=row_thr)
    # rows of several frames: each judged (its highest frame) against its series threshold
    out["series_rows"] = [{"frames": int(t), "rows": int(np.sum(frames == t)),
                           "threshold": float(row_thr[frames == t][0])}
                          for t in sorted(set(frames.tolist())) if t > 1]
    thr = out["at_threshold"]
    for key in ("accuracy", "precision", "recall", "sensitivity", "specificity", "f1", "balanced_accuracy",
                "tp", "fp", "tn", "fn"):
        out[key] = thr[key]
    out["score_direction_ok"] = bool(out["auroc"] >= 0.5)
    out["inference_seconds_per_image"] = float(result.seconds_per_image)
    out["timing"] = dict(result.timing)
    out["model"] = dict(result.model)
    out["model_name"] = str(result.model.get("name", ""))
    out["model_version"] = str(result.model.get("version", ""))
    out["dataset"] = result.dataset
    out["command"] = result.command
    out["date"] = result.date or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if result.style_baseline is not None:
        out["style_baseline"] = dict(result.style_baseline)
    if result.cv_folds:
        out["cv"] = {
            "settings": dict(result.cv_settings),
            "folds": [dict(f) for f in result.cv_folds],
            "summary": M.aggregate_folds(result.cv_folds, CV_KEYS),
        }
    return out


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ------------------------------------------------------------------------------------------- plots
def _figure(w: float = 5.0, h: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)


def plot_roc(scores, labels, threshold, metrics: Mapping[str, Any], path: Path, title: str) -> None:
    fpr, tpr, _ = M.roc_points(scores, labels)
    fig = _figure()
    ax = fig.add_subplot(111)
    lo, hi = metrics.get("auroc_ci95") or (float("nan"), float("nan"))
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {metrics['auroc']:.3f} (95% CI {lo:.3f}-{hi:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    at = metrics["at_threshold"]
    ax.plot([at["fpr"]], [at["sensitivity"]], "o", c="crimson", label=f"threshold {threshold:.4g}")
    ax.axvline(0.05, c="orange", lw=1, ls=":", label="5% FPR")
    ax.set_xlabel("False-positive rate (1 - specificity)")
    ax.set_ylabel("Sensitivity (true-positive rate)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_pr(scores, labels, metrics: Mapping[str, Any], path: Path, title: str) -> None:
    precision, recall, _ = M.pr_points(scores, labels)
    fig = _figure()
    ax = fig.add_subplot(111)
    ax.step(recall, precision, where="post", lw=2, label=f"AUPRC (AP) {metrics['auprc']:.3f}")
    ax.axhline(metrics["auprc_chance"], ls="--", c="grey", lw=1,
               label=f"chance (prevalence {metrics['auprc_chance']:.3f})")
    at = metrics["at_threshold"]
    if at["precision"] == at["precision"]:  # not NaN
        ax.plot([at["recall"]], [at["precision"]], "o", c="crimson", label="at threshold")
    ax.set_xlabel("Recall (sensitivity)")
    ax.set_ylabel("Precision (PPV)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(0.0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_histograms(scores, classes, threshold, path: Path, title: str) -> None:
    s = np.asarray(scores, dtype=np.float64)
    cls = np.asarray([str(c) for c in classes])
    names = sorted(set(cls), key=lambda c: (not M.is_normal_label(c), c))
    fig = _figure(6.0, 4.2)
    ax = fig.add_subplot(111)
    lo, hi = np.percentile(s, [0.5, 99.5])
    lo, hi = min(lo, threshold), max(hi, threshold)
    bins = np.linspace(lo, hi + 1e-12, 40)
    for name in names:
        v = np.clip(s[cls == name], lo, hi)
        ax.hist(v, bins=bins, histtype="step", lw=2 if M.is_normal_label(name) else 1.5, density=True,
                label=f"{name} (n={v.size})")
    ax.axvline(threshold, c="crimson", ls="--", lw=1.5, label=f"threshold {threshold:.4g}")
    ax.set_xlabel("Anomaly score (clipped to the 0.5-99.5 percentile range)")
    ax.set_ylabel("Density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_confusion(metrics: Mapping[str, Any], path: Path, title: str) -> None:
    at = metrics["at_threshold"]
    mat = np.array([[at["tn"], at["fp"]], [at["fn"], at["tp"]]])
    fig = _figure(4.2, 3.8)
    ax = fig.add_subplot(111)
    ax.imshow(mat, cmap="Blues")
    rows = mat.sum(axis=1, keepdims=True)
    for i in range(2):
        for j in range(2):
            pct = 100.0 * mat[i, j] / rows[i, 0] if rows[i, 0] else 0.0
            ax.text(j, i, f"{mat[i, j]}\n({pct:.1f}%)", ha="center", va="center",
                    color="white" if mat[i, j] > mat.max() / 2 else "black", fontsize=11)
    ax.set_xticks([0, 1], ["called normal", "called abnormal"])
    ax.set_yticks([0, 1], ["normal", "anomaly"])
    ax.set_xlabel("Prediction (score > threshold)")
    ax.set_ylabel("Truth")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def _overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    import cv2

    img = np.clip(image, 0.0, 1.0)
    h = np.clip(heat, 0.0, 1.0)
    if h.shape != img.shape:
        h = cv2.resize(h.astype(np.float32), (img.shape[1], img.shape[0]))
    colour = cv2.applyColorMap((h * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1] / 255.0
    alpha = 0.45 * h[..., None] + 0.1
    return np.clip((1 - alpha) * img[..., None] + alpha * colour, 0.0, 1.0)


def plot_gallery(items: Sequence[GalleryItem], path: Path, title: str) -> bool:
    """Rows: true positives, false positives, false negatives; each item as image + overlay. Returns
    False (and writes nothing) when there are no items."""
    by_kind = {k: [i for i in items if i.kind == k] for k, _ in GALLERY_KINDS}
    kinds = [(k, t) for k, t in GALLERY_KINDS if by_kind[k]]
    if not kinds:
        return False
    ncol = max(len(by_kind[k]) for k, _ in kinds)
    fig = _figure(2.0 * 2 * ncol, 2.45 * len(kinds) + 0.4)
    for r, (kind, label) in enumerate(kinds):
        for c in range(ncol):
            ax_img = fig.add_subplot(len(kinds), 2 * ncol, r * 2 * ncol + 2 * c + 1)
            ax_ovl = fig.add_subplot(len(kinds), 2 * ncol, r * 2 * ncol + 2 * c + 2)
            for ax in (ax_img, ax_ovl):
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_frame_on(False)
            if c >= len(by_kind[kind]):
                continue
            it = by_kind[kind][c]
            ax_img.imshow(np.clip(it.image, 0, 1), cmap="gray", vmin=0, vmax=1)
            ax_ovl.imshow(_overlay(it.image, it.heatmap))
            ax_img.set_title(f"{it.label}  s={it.score:.3g}", fontsize=7)
            ax_ovl.set_title(Path(it.name).name[:26], fontsize=6)
            if c == 0:
                ax_img.set_ylabel(label.split(" (")[0], fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return True


# ------------------------------------------------------------------------------------------- markdown
def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    return "n/a" if not math.isfinite(x) else f"{x:.{nd}f}"


def _ms(x: Any) -> str:
    return "n/a" if x is None or not math.isfinite(float(x)) else f"{1000.0 * float(x):.1f} ms"


def render_markdown(m: Mapping[str, Any], result: EvaluationResult, plots: Mapping[str, str]) -> str:
    model = m["model"]
    lo, hi = m["auroc_ci95"]
    L: list[str] = []
    L.append(f"# Evaluation: {model.get('name', '?')} {model.get('version', '')} on {m['dataset']}")
    L.append("")
    L.append(f"*Generated {m['date']} by `medgru evaluate`.* NOT FOR DIAGNOSTIC USE.")
    L.append("")
    L.append("| | |")
    L.append("| --- | --- |")
    L.append(f"| Model | `{model.get('name', '?')}` version `{model.get('version', '?')}` "
             f"(detector `{model.get('detector', '?')}`) |")
    if model.get("path"):
        L.append(f"| Model folder | `{model['path']}` |")
    L.append(f"| Dataset | {m['dataset']} |")
    L.append(f"| Cases | {m['n_normal']} normal, {m['n_anomaly']} anomaly |")
    L.append(f"| Decision threshold | {m['threshold']:.6g} (the model's own, calibrated on normals only) |")
    L.append("")
    L.append("Command:")
    L.append("")
    L.append("```")
    L.append(m["command"])
    L.append("```")
    L.append("")
    L.append("## Headline metrics")
    L.append("")
    L.append("| metric | value |")
    L.append("| --- | --- |")
    L.append(f"| AUROC (95% bootstrap CI) | **{_f(m['auroc'])}** ({_f(lo)}-{_f(hi)}) |")
    L.append(f"| AUPRC (average precision; chance = prevalence {_f(m['auprc_chance'])}) | {_f(m['auprc'])} |")
    L.append(f"| Sensitivity at 95% specificity | {_f(m['sens_at_95_spec'])} |")
    L.append(f"| FPR at 95% sensitivity | {_f(m['fpr_at_95_sens'])} |")
    if not m["score_direction_ok"]:
        L.append("")
        L.append("**Warning: AUROC < 0.5: the score ranks normals above anomalies on this data set.**")
    L.append("")
    L.append(f"## At the model's threshold ({m['threshold']:.6g}; abnormal when score > threshold)")
    L.append("")
    if m.get("series_rows"):
        L.append("Rows of several frames are judged as the service judges a series: their score is their "
                 "highest frame's, scored alone, against the series threshold of their frame count (the "
                 "calibration normals' quantile at the target rate divided by the frame count):")
        L.append("")
        L.append("| frames | rows | series threshold |")
        L.append("| --- | --- | --- |")
        for r in m["series_rows"]:
            L.append(f"| {r['frames']} | {r['rows']} | {r['threshold']:.6g} |")
        L.append("")
    L.append("| sensitivity (recall) | specificity | precision (PPV) | accuracy | balanced acc. | F1 | TP | FP | TN | FN |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    L.append(f"| {_f(m['sensitivity'])} | {_f(m['specificity'])} | {_f(m['precision'])} | {_f(m['accuracy'])} | "
             f"{_f(m['balanced_accuracy'])} | {_f(m['f1'])} | {m['tp']} | {m['fp']} | {m['tn']} | {m['fn']} |")
    L.append("")
    L.append("## Per class")
    L.append("")
    L.append("Each anomaly class against all normals; *flagged* is the share of the class called abnormal "
             "(for normals that is the false-positive rate).")
    L.append("")
    L.append("| class | n | AUROC vs normals | flagged at threshold |")
    L.append("| --- | --- | --- | --- |")
    pc = m.get("per_class_auroc", {})
    for name, n in sorted(m.get("n_per_class", {}).items(), key=lambda kv: (not M.is_normal_label(kv[0]), kv[0])):
        auc = "-" if M.is_normal_label(name) else _f(pc.get(name))
        L.append(f"| {name} | {n} | {auc} | {_f(m['per_class_flagged_rate'].get(name))} |")
    L.append("")
    L.append("## Speed")
    L.append("")
    t = m.get("timing", {})
    L.append("| measure | time |")
    L.append("| --- | --- |")
    L.append(f"| `score_batch`, wall time per image (batched) | {_ms(m['inference_seconds_per_image'])} |")
    for key, label in (("detect_seconds_median", "`detect(explain=False)`, one image, median"),
                       ("explain_seconds_median", "`detect(explain=True)` (score + heat map), one image, median")):
        if key in t:
            L.append(f"| {label} | {_ms(t[key])} |")
    for key in ("device", "torch_threads", "cpu", "cpu_count", "load_average_after_scoring"):
        if key in t:
            L.append(f"| {key.replace('_', ' ')} | {t[key]} |")
    L.append("")
    if "load_average_after_scoring" in t:
        L.append("")
        L.append("Timings are wall-clock on the machine named above; a load average above the CPU count means "
                 "the run shared the CPUs with other work and the times are inflated accordingly "
                 "(see `benchmarks/results/inference_speed.json` for the dedicated speed benchmark).")
    env = m.get("environment")
    if env:
        L.append("Software: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".")
        L.append("")
    L.append("")
    L.append("## Plots")
    L.append("")
    for key, caption in (("roc", "ROC curve; the dot is the model's threshold"),
                         ("pr", "Precision-recall curve"),
                         ("hist", "Score distributions by class, with the threshold"),
                         ("confusion", "Confusion matrix at the threshold")):
        if key in plots:
            L.append(f"![{caption}]({plots[key]})")
            L.append("")
            L.append(f"*{caption}.*")
            L.append("")
    if "gallery" in plots:
        L.append("## Heat-map gallery")
        L.append("")
        L.append("Each case is shown as the input image and its heat map overlay (red = most anomalous). "
                 "Rows: " + "; ".join(t for _, t in GALLERY_KINDS) + ".")
        L.append("")
        L.append(f"![Heat-map gallery]({plots['gallery']})")
        L.append("")
        L.append("| kind | image | class | score |")
        L.append("| --- | --- | --- | --- |")
        for it in result.gallery:
            L.append(f"| {it.kind.replace('_', ' ')} | `{it.name}` | {it.label} | {it.score:.4g} |")
        L.append("")
    if "cv" in m:
        cv = m["cv"]
        s = cv["settings"]
        L.append(f"## {len(cv['folds'])}-fold cross-validation")
        L.append("")
        L.append(s.get("description", ""))
        L.append("")
        keys = [k for k in CV_KEYS if k in cv["summary"] and cv["summary"][k].get("n", 1)]
        L.append("| fold | n train normals | n calibration normals | " + " | ".join(keys) + " |")
        L.append("| --- | --- | --- | " + " | ".join("---" for _ in keys) + " |")
        for f in cv["folds"]:
            L.append(f"| {f.get('fold')} | {f.get('n_fit')} | {f.get('n_calibration')} | "
                     + " | ".join(_f(f.get(k), 4 if k == 'threshold' else 3) for k in keys) + " |")
        L.append("| **mean ± std** | | | " + " | ".join(
            f"**{_f(cv['summary'][k]['mean'])} ± {_f(cv['summary'][k]['std'])}**" for k in keys) + " |")
        L.append("")
    sb = m.get("style_baseline")
    if sb is not None:
        L.append("## Style baseline (lesion-blind reference)")
        L.append("")
        if sb.get("auroc") is None:
            L.append(f"Not computed: {sb.get('skipped', 'no train split')}.")
        else:
            L.append(f"A logistic regression on {len(sb['statistics'])} per-image statistics that see no lesion "
                     f"({', '.join(sb['statistics'])}), fitted on the manifest's train split "
                     f"({sb['n_train_normal']} normal, {sb['n_train_anomaly']} anomaly images; it uses their "
                     f"labels), scores AUROC **{_f(sb['auroc'])}** on these evaluation rows, against the model's "
                     f"{_f(m['auroc'])}. A model at or below it has not shown that it finds more than how the "
                     "classes' images were made (`training/style.py`).")
        L.append("")
    L.append("## Method and caveats")
    L.append("")
    L.append("- Metrics are computed on the evaluation rows only (the `test` split, or every row when the "
             "manifest has no split). The threshold comes from the model folder and was set on normal "
             "images; no anomaly label was used to choose it.")
    L.append("- Label `normal` (or `0`) is the negative class; every other label is an anomaly class.")
    L.append("- AUROC 95% CI: stratified percentile bootstrap (1000 resamples of normals and anomalies).")
    L.append("- Sensitivity at 95% specificity and FPR at 95% sensitivity are read off the empirical ROC "
             "curve (best operating point meeting the constraint on this test set: optimistic).")
    for note in result.notes:
        L.append(f"- {note}")
    L.append("")
    L.append("Files: `metrics.json` (all numbers), `scores.csv` (per-image scores).")
    L.append("")
    return "\n".join(L)


# ------------------------------------------------------------------------------------------- entry
def write_report(out_dir: Path, result: EvaluationResult, *, n_boot: int = 1000) -> dict[str, Any]:
    """Write ``metrics.json``, ``scores.csv``, the plots and ``report.md`` into ``out_dir``; return the
    metrics dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(result.scores, dtype=np.float64)
    labels = M.binary_labels(result.classes)
    m = compute_metrics(result, n_boot=n_boot)
    title = f"{m['model_name']} on {result.dataset}"
    short = f"{m['model_name']}\n{result.dataset}"

    plots: dict[str, str] = {}
    plot_roc(scores, labels, result.threshold, m, out_dir / "roc.png", f"ROC: {short}")
    plots["roc"] = "roc.png"
    plot_pr(scores, labels, m, out_dir / "pr.png", f"Precision-recall: {short}")
    plots["pr"] = "pr.png"
    plot_histograms(scores, result.classes, result.threshold, out_dir / "score_hist.png", f"Scores: {short}")
    plots["hist"] = "score_hist.png"
    plot_confusion(m, out_dir / "confusion.png", f"Confusion at threshold {result.threshold:.4g}")
    plots["confusion"] = "confusion.png"
    if plot_gallery(result.gallery, out_dir / "gradcam_gallery.png", f"Heat maps: {title}"):
        plots["gallery"] = "gradcam_gallery.png"
    m["plots"] = plots
    m["environment"] = software_environment()

    with open(out_dir / "scores.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "label", "score", "called_abnormal"])
        rule = _row_rule(result)
        called = M.called_abnormal(scores, result.threshold if rule is None else rule)
        for name, cls, s, c in zip(result.names, result.classes, scores, called):
            w.writerow([name, cls, f"{s:.8g}", int(c)])

    (out_dir / "metrics.json").write_text(json.dumps(_clean(m), indent=2, sort_keys=True) + "\n")
    (out_dir / "report.md").write_text(render_markdown(m, result, plots))
    return m
