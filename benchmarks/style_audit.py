"""Can image style alone tell a benchmark's classes apart, and does the bundled model's score see more?

    MEDGRU_DATA_ROOT=<data> python benchmarks/style_audit.py --dataset brain_mri [--model DIR] [--threads 2]

The data README warns that the brain MRI classes come from different source collections (different
scanners, contrasts and JPEG histories), "so a detector can latch onto source or style cues instead of
pathology"; on Kermany two such cues (framing, sharpness) were found before (``medgru-v7.md``,
``blur-v10-kermany_cxr.md``). This script measures that risk on the TRAIN split; without ``--test-split``
(below) no test image is read.

Images: the bundled model's own calibration normals (its ``group_split`` rebuilt from ``training.json``: held
out from its encoder and its boundary) and 500 random train-split anomalies (seed 0), the set of
``hpo_diagnosis.py``. Each image is read as training reads it (grey value / 255).

Style statistics, none of which looks for a lesion: the eight of ``training/style.py`` (grey-level mean,
std and 99.5th percentile, foreground share, background noise, sharpness, JPEG blockiness, framing against
the model's fit normals' mean thumbnail).

Reported, with "AUROC" always normals against anomalies:

* each statistic's AUROC (a value below 0.5 means the anomalies have the lower values);
* **style-only classifier**: a logistic regression on the standardised statistics, out-of-fold predictions
  of a 5-fold stratified cross-validation over these images. This uses the train split's labels; it is a
  diagnostic of the data, not a model, and chooses nothing;
* the model's anomaly-score AUROC on the same images, and per anomaly class both AUROCs;
* **the model within style strata**: the images cut into five equal bins of the style classifier's
  out-of-fold probability; the model's AUROC inside each bin that holds at least 10 of each class, and
  their mean weighted by the bin's pairs. Within a bin, style says little about the class, so what the
  model still separates there it separates by something else. (Bins where one class dominates drop out;
  how many pairs are left is reported.)
* the Spearman correlation of the model's score with the style classifier's logit, in each class.
* (added after the first run, which left under 20 % of the pairs in the equal-count bins because the
  anomalies crowd the upper bins) the same with five bins of equal counts of **normals**, the outer bins
  open-ended, so that every bin holds about a fifth of the normals and whatever anomalies fall there.

The reading, fixed before the first run (2026-12-07):

* style-only AUROC >= 0.90: the classes can be told apart by style alone, so a high benchmark figure does
  not by itself show that a detector finds lesions;
* the model within the style strata, where at least 20 % of the pairs are left: >= 0.85, the model
  separates the classes where style does not; < 0.75, its figure is largely style; in between, partly.
  Under 20 % of the pairs left: undetermined.

``--test-split`` (added after the train-split runs, and a declared look at the test images; it chooses
nothing) also reads the TEST split: each statistic's test AUROC, the train-fitted style classifier applied
to the test images, a style-only classifier cross-validated inside the test split (how much of the test
figure style alone could reach), the model's test AUROC inside style bins of equal counts of test normals,
and how far the test normals' style is from the train normals'. Those results go to
``style_audit-<dataset>-test.json`` / ``.md``.

Writes ``style_audit-<dataset>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.hpo_diagnosis import load_with_training_args, model_parser, write_results  # noqa: E402
from benchmarks.recipe_selection import auroc  # noqa: E402
from training.style import (STATS, cross_validated_style, fit_style_classifier,  # noqa: E402
                            statistics_matrix, thumbnail_template)


def within_strata(score: np.ndarray, style: np.ndarray, y: np.ndarray, bins: int = 5,
                  min_each: int = 10, by: str = "all") -> dict[str, Any]:
    """The model's AUROC inside bins of ``style`` with equal counts of all images (``by="all"``) or of the
    normals (``by="normals"``, the outer bins open-ended); the pair-weighted mean over the bins that hold
    at least ``min_each`` images of each class."""
    edges = np.quantile(style if by == "all" else style[y == 0], np.linspace(0, 1, bins + 1))
    if by != "all":
        edges[0], edges[-1] = -np.inf, np.inf
    which = np.clip(np.searchsorted(edges, style, side="right") - 1, 0, bins - 1)
    rows, num, pairs_total = [], 0.0, 0
    for b in range(bins):
        m = which == b
        n0, n1 = int((y[m] == 0).sum()), int((y[m] == 1).sum())
        row = {"bin": b + 1, "normals": n0, "anomalies": n1, "auroc": None}
        if n0 >= min_each and n1 >= min_each:
            row["auroc"] = auroc(score[m & (y == 0)], score[m & (y == 1)])
            num += row["auroc"] * n0 * n1
            pairs_total += n0 * n1
        rows.append(row)
    all_pairs = int((y == 0).sum() * (y == 1).sum())
    return {"bins": rows, "weighted_auroc": num / pairs_total if pairs_total else None,
            "pairs_used": pairs_total, "pairs_all": all_pairs}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def audit(det: Any, args: dict[str, Any], dataset: str, data_root: Path, cache_dir: Path,
          test: bool = False) -> dict[str, Any]:
    from benchmarks.score_reading import split_rows  # (it imports this module: here, not at the top)
    from training.manifest import load_sequences
    from training.train import FeatureCache

    rows, fit, _, cal, anomalies = split_rows(args, dataset, data_root)
    images = cal + anomalies
    y = np.array([0] * len(cal) + [1] * len(anomalies))
    classes = np.array(["normal"] * len(cal) + [str(r.label) for r in anomalies])

    template = thumbnail_template([s.frames[-1] for s in load_sequences(fit)])
    x = statistics_matrix([s.frames[-1] for s in load_sequences(images)], template)
    cache = FeatureCache(cache_dir, det)
    score = det.boundary.score(det.embed_features(cache.features(images, desc="images")))
    style = cross_validated_style(x, y)

    per_stat = {k: auroc(x[y == 0, i], x[y == 1, i]) for i, k in enumerate(STATS)}
    per_class = {}
    for c in sorted(set(classes) - {"normal"}):
        m = (classes == "normal") | (classes == c)
        per_class[c] = {"n": int((classes == c).sum()), "model": auroc(score[m & (y == 0)], score[m & (y == 1)]),
                        "style_only": auroc(style[m & (y == 0)], style[m & (y == 1)])}
    res = {
        "model": f"{det.card.name} {det.card.version}", "dataset": dataset,
        "n": {"calibration_normals": len(cal), "train_anomalies": len(anomalies)},
        "statistics_auroc": per_stat,
        "style_only_auroc": auroc(style[y == 0], style[y == 1]),
        "model_auroc": auroc(score[y == 0], score[y == 1]),
        "per_class": per_class,
        "model_within_style_strata": within_strata(score, style, y),
        "model_within_style_strata_normal_bins": within_strata(score, style, y, by="normals"),
        "spearman_model_vs_style": {"normals": spearman(score[y == 0], style[y == 0]),
                                    "anomalies": spearman(score[y == 1], style[y == 1])},
    }
    if test:
        res["test"] = test_audit(det, rows, x, y, template, cache)
    return res


def test_audit(det: Any, rows: list, x_train: np.ndarray, y_train: np.ndarray, template: np.ndarray,
               cache: Any) -> dict[str, Any]:
    """The TEST split (``--test-split``): the style classifier fitted on the train images above and applied
    to the test images; a style-only classifier cross-validated inside the test split; the model's test
    AUROC, within style bins of the latter and its Spearman with it."""
    from training.manifest import load_sequences

    test_rows = [r for r in rows if r.split == "test"]
    yt = np.array([0 if r.is_normal else 1 for r in test_rows])
    xt = statistics_matrix([s.frames[-1] for s in load_sequences(test_rows)], template)
    score = det.boundary.score(det.embed_features(cache.features(test_rows, desc="test images")))
    clf = fit_style_classifier(x_train, y_train)
    transferred = clf.decision_function(xt)
    inside = cross_validated_style(xt, yt)
    return {
        "n": {"normals": int((yt == 0).sum()), "anomalies": int((yt == 1).sum())},
        "statistics_auroc": {k: auroc(xt[yt == 0, i], xt[yt == 1, i]) for i, k in enumerate(STATS)},
        "style_classifier_from_train_auroc": auroc(transferred[yt == 0], transferred[yt == 1]),
        "style_only_cv_in_test_auroc": auroc(inside[yt == 0], inside[yt == 1]),
        "model_auroc": auroc(score[yt == 0], score[yt == 1]),
        "model_within_style_strata_normal_bins": within_strata(score, inside, yt, by="normals"),
        "spearman_model_vs_style": {"normals": spearman(score[yt == 0], inside[yt == 0]),
                                    "anomalies": spearman(score[yt == 1], inside[yt == 1])},
        "train_vs_test_normals_style_auroc": auroc(
            clf.decision_function(x_train[y_train == 0]), transferred[yt == 0]),
    }


def write_md(res: dict[str, Any], path: Path) -> str:
    n = res["n"]
    lines = [f"# Style audit: `{res['model']}` on {res['dataset']} (train split only)", "",
             f"Generated by `{res['command']}` in {res['seconds']:.0f} s (protocol: the script's docstring). "
             f"{n['calibration_normals']} calibration normals (held out from the model) against "
             f"{n['train_anomalies']} train-split anomalies; no test image was read.", "",
             "| score | AUROC normals vs anomalies |", "| --- | --- |"]
    lines += [f"| style statistic: {k} | {v:.3f} |" for k, v in res["statistics_auroc"].items()]
    lines += [f"| **style-only classifier** (logistic regression on the {len(res['statistics_auroc'])} "
              f"statistics, 5-fold out-of-fold) | **{res['style_only_auroc']:.3f}** |",
              f"| **the model's anomaly score** | **{res['model_auroc']:.3f}** |", ""]
    if len(res["per_class"]) > 1:
        lines += ["| anomaly class | images | model AUROC | style-only AUROC |", "| --- | --- | --- | --- |"]
        lines += [f"| {c} | {v['n']} | {v['model']:.3f} | {v['style_only']:.3f} |" for c, v in res["per_class"].items()]
        lines.append("")
    for key, title in (("model_within_style_strata", "five bins of equal counts of all images"),
                       ("model_within_style_strata_normal_bins",
                        "five bins of equal counts of normals (added after the first run)")):
        w = res[key]
        lines += [f"The model inside {title}, by the style classifier's out-of-fold probability:", "",
                  "| bin (low to high style probability of an anomaly) | normals | anomalies | model AUROC |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {b['bin']} | {b['normals']} | {b['anomalies']} | "
                  + ("–" if b["auroc"] is None else f"{b['auroc']:.3f}") + " |" for b in w["bins"]]
        wa = "–" if w["weighted_auroc"] is None else f"{w['weighted_auroc']:.3f}"
        lines += ["", f"Pair-weighted mean over the bins with at least 10 of each class: **{wa}** "
                  f"({w['pairs_used']} of {w['pairs_all']} normal-anomaly pairs).", ""]
    sp = res["spearman_model_vs_style"]
    lines += [f"Spearman of the model's score with the style logit: normals {sp['normals']:.3f}, anomalies "
              f"{sp['anomalies']:.3f}.", ""]
    if "test" in res:
        t = res["test"]
        w = t["model_within_style_strata_normal_bins"]
        wa = "–" if w["weighted_auroc"] is None else f"{w['weighted_auroc']:.3f}"
        lines += ["## The test split (`--test-split`: a declared look at the test images)", "",
                  f"{t['n']['normals']} normals, {t['n']['anomalies']} anomalies.", "",
                  "| score | test AUROC normals vs anomalies |", "| --- | --- |"]
        lines += [f"| style statistic: {k} | {v:.3f} |" for k, v in t["statistics_auroc"].items()]
        lines += [f"| style classifier fitted on the train images above | {t['style_classifier_from_train_auroc']:.3f} |",
                  f"| style-only classifier, 5-fold out-of-fold inside the test split | "
                  f"{t['style_only_cv_in_test_auroc']:.3f} |",
                  f"| the model's anomaly score | {t['model_auroc']:.3f} |", "",
                  f"The model inside five style bins of equal counts of test normals: **{wa}** "
                  f"({w['pairs_used']} of {w['pairs_all']} pairs); bins: " + ", ".join(
                      f"{b['normals']}/{b['anomalies']}" + ("" if b["auroc"] is None else f" {b['auroc']:.3f}")
                      for b in w["bins"]) + ". Spearman of the model's test score with the in-test style logit: "
                  f"normals {t['spearman_model_vs_style']['normals']:.3f}, anomalies "
                  f"{t['spearman_model_vs_style']['anomalies']:.3f}. The train-fitted style classifier's "
                  f"logit, train calibration normals against test normals: AUROC "
                  f"{t['train_vs_test_normals_style_auroc']:.3f} (0.5: the same style).", ""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    import tempfile

    ap: argparse.ArgumentParser = model_parser(__doc__.splitlines()[0], "(not used here; see --test-split)")
    ap.add_argument("--test-split", action="store_true",
                    help="also read the TEST split: a declared look at the test images (see the docstring)")
    ns = ap.parse_args(argv)
    if ns.test_sensitivity:
        raise SystemExit("use --test-split")
    t0 = time.time()
    det, args = load_with_training_args(ns)
    with tempfile.TemporaryDirectory(prefix="style-audit-") as tmp:
        res = audit(det, args, ns.dataset, ns.data_root, ns.cache or Path(tmp), test=ns.test_split)
    res["command"] = f"python benchmarks/style_audit.py --dataset {ns.dataset}" + (
        f" --model {ns.model}" if ns.model else "") + (" --test-split" if ns.test_split else "")
    res["seconds"] = time.time() - t0
    write_results(res, ns.out / (f"style_audit-{ns.dataset}" + ("-test" if ns.test_split else "")), write_md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
