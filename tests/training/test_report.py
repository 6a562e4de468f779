"""training.report: every file is written, metrics.json has the promised keys, report.md embeds the plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training import metrics as M
from training.report import EvaluationResult, GalleryItem, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUIRED_KEYS = ("auroc", "auprc", "sens_at_95_spec", "fpr_at_95_sens", "threshold", "n_normal", "n_anomaly",
                 "per_class_auroc", "accuracy", "f1", "precision", "recall", "specificity", "sensitivity",
                 "inference_seconds_per_image", "model_name", "model_version", "dataset", "command", "date")


def _result(with_cv: bool = True, gallery: bool = True) -> EvaluationResult:
    rng = np.random.default_rng(0)
    classes = ["normal"] * 40 + ["glioma"] * 20 + ["pituitary"] * 20
    scores = np.r_[rng.normal(0, 1, 40), rng.normal(2, 1, 20), rng.normal(0.5, 1, 20)]
    items = []
    if gallery:
        for kind in ("true_positive", "false_positive", "false_negative"):
            for j in range(2):
                img = rng.random((32, 40)).astype(np.float32)
                items.append(GalleryItem(kind=kind, name=f"test/x/{kind}_{j}.jpg", label="glioma",
                                         score=float(j), image=img, heatmap=rng.random((32, 40)).astype(np.float32)))
    folds = [{"fold": i + 1, "n_fit": 30, "n_calibration": 10, "auroc": 0.8 + 0.01 * i, "auprc": 0.7,
              "sens_at_95_spec": 0.3, "fpr_at_95_sens": 0.6, "sensitivity": 0.5, "specificity": 0.95,
              "f1": float("nan"), "accuracy": 0.7, "threshold": 1.5} for i in range(3)] if with_cv else []
    return EvaluationResult(
        scores=scores, classes=classes, names=[f"img{i}.jpg" for i in range(80)], threshold=1.0,
        model={"name": "toy", "version": "9.9", "detector": "knn-effnet"}, dataset="toy set",
        command="medgru evaluate --manifest x.csv --out y", seconds_per_image=0.0123,
        timing={"explain_seconds_median": 0.2}, gallery=items, cv_folds=folds,
        cv_settings={"k": 3, "description": "three folds"}, notes=["a note"])


def test_write_report_writes_every_file(tmp_path):
    res = _result()
    m = write_report(tmp_path, res, n_boot=100)
    for name in ("metrics.json", "report.md", "scores.csv", "roc.png", "pr.png", "score_hist.png",
                 "confusion.png", "gradcam_gallery.png"):
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == PNG_MAGIC
    data = json.loads((tmp_path / "metrics.json").read_text())
    for key in REQUIRED_KEYS:
        assert key in data, key
    labels = M.binary_labels(res.classes)
    assert data["auroc"] == pytest.approx(M.auroc(res.scores, labels))
    assert data["n_normal"] == 40 and data["n_anomaly"] == 40
    assert set(data["per_class_auroc"]) == {"glioma", "pituitary"}
    assert data["per_class_auroc"]["glioma"] > data["per_class_auroc"]["pituitary"]
    assert data["inference_seconds_per_image"] == pytest.approx(0.0123)
    assert data["model_name"] == "toy" and data["model_version"] == "9.9"
    import torch  # the software the numbers came from, as installed (not a fixed string)
    from importlib import metadata

    assert data["environment"]["torch"] == metadata.version("torch") and torch.__version__.startswith(
        data["environment"]["torch"].split("+")[0])
    assert data["environment"]["numpy"] == np.__version__
    assert f"numpy {np.__version__}" in (tmp_path / "report.md").read_text()
    # cross-validation: NaN became null, mean/std over the folds
    assert data["cv"]["folds"][0]["f1"] is None
    assert data["cv"]["summary"]["auroc"]["mean"] == pytest.approx(0.81)
    assert m["cv"]["summary"]["auroc"]["std"] == pytest.approx(0.01)
    lines = (tmp_path / "scores.csv").read_text().splitlines()
    assert len(lines) == 81 and lines[0] == "name,label,score,called_abnormal"


def test_report_markdown_embeds_plots_and_tables(tmp_path):
    write_report(tmp_path, _result(), n_boot=50)
    md = (tmp_path / "report.md").read_text()
    for png in ("roc.png", "pr.png", "score_hist.png", "confusion.png", "gradcam_gallery.png"):
        assert f"]({png})" in md
    assert "medgru evaluate --manifest x.csv --out y" in md
    assert "| glioma | 20 |" in md
    assert "3-fold cross-validation" in md and "mean ± std" in md
    assert "a note" in md
    assert "12.3 ms" in md


def test_report_without_gallery_or_cv(tmp_path):
    write_report(tmp_path, _result(with_cv=False, gallery=False), n_boot=0)
    assert not (tmp_path / "gradcam_gallery.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "gradcam_gallery.png" not in md and "cross-validation" not in md
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert "cv" not in data and data["auroc_ci95"] == [None, None]


def test_inverted_scores_are_flagged(tmp_path):
    res = _result(with_cv=False)
    res.scores = -np.asarray(res.scores)
    m = write_report(tmp_path, res, n_boot=0)
    assert m["auroc"] < 0.5 and not m["score_direction_ok"]
    assert "Warning: AUROC < 0.5" in (tmp_path / "report.md").read_text()
