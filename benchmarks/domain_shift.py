"""Does a data set's test split look like its training split? A label-free-model diagnostic.

For each benchmark (Kermany chest X-ray, brain MRI) a k-NN scorer (mean distance to the 5 nearest
neighbours, standardised GAP of the frozen multi-scale EfficientNet-Lite0 maps, CLAHE as the detectors use
it) is fitted on 75 % of the TRAIN split's normals (grouped by patient where the manifest has groups).
It then scores the other 25 % (held-out train normals), a random sample of 500 TRAIN anomalies, and the
whole TEST split. Reported AUROCs:

* held-out train normals vs train anomalies: what a validation split cut from train would promise;
* held-out train normals vs TEST normals: 0.5 means the test normals look like the training normals;
  above 0.5, the test normals are shifted away from the normals the model learnt (covariate shift);
* held-out train normals vs test anomalies, and test normals vs test anomalies (the benchmark figure);
* the FPR on test normals at the threshold that gives 5 % FPR on held-out train normals.

This measures the benchmark, not a model: test labels are used only to report, never to choose anything.

    python benchmarks/domain_shift.py [--data-root DIR]

Writes ``benchmarks/results/domain_shift.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATASETS = (("kermany_cxr", "Kermany CXR"), ("brain_mri", "Brain MRI"))


def gap_features(rows, det, batch: int = 32) -> np.ndarray:
    from training.manifest import load_sequences

    out = []
    for i in range(0, len(rows), batch):
        seqs = load_sequences(rows[i:i + batch])
        pre = np.stack([det.preprocess(s)[-1] for s in seqs])
        out.append(det.frame_features(pre).mean(dim=(2, 3)).double().numpy())
    return np.concatenate(out)


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]))


def measure(manifest: Path, seed: int = 0) -> dict:
    from sklearn.neighbors import NearestNeighbors

    from inference.detectors.medgru_svc import MedGRUSVC
    from training.manifest import read_manifest

    rows = read_manifest(manifest)
    rng = np.random.default_rng(seed)
    normals = [r for r in rows if r.split == "train" and r.is_normal]
    anomalies = [r for r in rows if r.split == "train" and not r.is_normal]
    anomalies = [anomalies[i] for i in sorted(rng.choice(len(anomalies), min(500, len(anomalies)), replace=False))]
    test = [r for r in rows if r.split == "test"]
    groups = sorted({r.group or str(r.path) for r in normals})
    held_groups = set(rng.choice(groups, len(groups) // 4, replace=False).tolist())
    held = np.array([(r.group or str(r.path)) in held_groups for r in normals])
    det = MedGRUSVC()
    t0 = time.perf_counter()
    e_norm, e_anom, e_test = gap_features(normals, det), gap_features(anomalies, det), gap_features(test, det)
    fit = e_norm[~held]
    mu, sd = fit.mean(0), fit.std(0) + 1e-6
    nn = NearestNeighbors(n_neighbors=5).fit((fit - mu) / sd)

    def score(e: np.ndarray) -> np.ndarray:
        return nn.kneighbors((e - mu) / sd)[0].mean(1)

    s_held, s_anom, s_test = score(e_norm[held]), score(e_anom), score(e_test)
    is_anom = np.array([not r.is_normal for r in test])
    thr = float(np.quantile(s_held, 0.95))
    return {
        "n_fit_normals": int((~held).sum()), "n_heldout_train_normals": int(held.sum()),
        "n_train_anomalies": len(anomalies), "n_test_normals": int((~is_anom).sum()),
        "n_test_anomalies": int(is_anom.sum()),
        "auroc_heldout_normals_vs_train_anomalies": auroc(s_held, s_anom),
        "auroc_heldout_normals_vs_test_normals": auroc(s_held, s_test[~is_anom]),
        "auroc_heldout_normals_vs_test_anomalies": auroc(s_held, s_test[is_anom]),
        "auroc_test_normals_vs_test_anomalies": auroc(s_test[~is_anom], s_test[is_anom]),
        "fpr_heldout_normals_at_thr": float((s_held > thr).mean()),
        "fpr_test_normals_at_thr": float((s_test[~is_anom] > thr).mean()),
        "tpr_test_anomalies_at_thr": float((s_test[is_anom] > thr).mean()),
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("MEDGRU_DATA_ROOT", "../shared/data")))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "domain_shift")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    results = {key: measure(args.data_root / key / "manifest.csv") for key, _ in DATASETS
               if (args.data_root / key / "manifest.csv").is_file()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Train/test shift of the benchmarks (k-NN on frozen GAP features; a diagnostic, not a model)", "",
             "Command: `python benchmarks/domain_shift.py` (data root from `MEDGRU_DATA_ROOT`). "
             "See the script's docstring for the protocol.", "",
             "| data set | held-out train normals vs train anomalies | held-out train normals vs TEST normals "
             "| test normals vs test anomalies | FPR on test normals at the 5 %-FPR train threshold "
             "| TPR on test anomalies there |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, title in DATASETS:
        if key not in results:
            continue
        r = results[key]
        lines.append(f"| {title} | {r['auroc_heldout_normals_vs_train_anomalies']:.3f} "
                     f"| {r['auroc_heldout_normals_vs_test_normals']:.3f} "
                     f"| {r['auroc_test_normals_vs_test_anomalies']:.3f} | {r['fpr_test_normals_at_thr']:.3f} "
                     f"| {r['tpr_test_anomalies_at_thr']:.3f} |")
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
