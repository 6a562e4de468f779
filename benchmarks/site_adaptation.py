"""How much of a bundled model's test-split gap is its reference of normals? Site normals, encoder fixed.

    MEDGRU_DATA_ROOT=<data> python benchmarks/site_adaptation.py --dataset kermany_cxr \\
        [--model inference/bundled/chest-cxr] [--splits 20] [--cache DIR] [--out benchmarks/results]

``domain_shift.md`` showed that Kermany's test normals are easy to tell from its train normals. A site
that deploys a model has normals of its own, and two things could use them: ``medgru calibrate`` (the
threshold only) and a boundary refit on them (the encoder fixed). This measures both, as a site would
see them, with the TEST split playing the site:

* the test normals are split by patient group, half and half, into *site normals* (A) and *evaluation
  normals* (E), ``--splits`` times with seeds 0, 1, ...; every test anomaly is an evaluation anomaly;
* every figure is computed on E against all test anomalies: nothing is scored on images it was fit on;
* boundaries, each an RBF SVDD with the model's own gamma, nu and whitening (no new search):
  - ``bundled``: the model's boundary as shipped;
  - ``refit, training set``: refit on the model's own boundary training set (its fit normals, plus their
    re-framed copies where the recipe had them), rebuilt by ``hpo_diagnosis.embeddings``; a control,
    which must reproduce ``bundled``;
  - ``refit, training set + A``: the site normals added;
  - ``refit, training set + A weighted``: A repeated until it weighs as much as the training set;
* k-NN references in the bundled boundary's whitened space (mean distance to the 5 nearest), a check
  that the SVDD is not what limits: the training set, A alone, both;
* operating point (``medgru calibrate``'s question): the FPR on E and the TPR on the anomalies at the
  bundled threshold, and at the split-conformal threshold (5 % FPR) of the bundled scores of A.

The labels of the test split score and choose nothing. The rule for what would be built from this was
written before the first (exploratory) run: a command that refits the boundary on a site's normals only if,
on Kermany, ``refit, training set + A`` gains at least 0.02 mean AUROC over ``bundled``. It changes no
model.

Writes ``site_adaptation-<dataset>.md`` and ``.json`` under ``--out``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.hpo_diagnosis import embeddings, load_with_training_args, model_parser, write_results  # noqa: E402

K_NEIGHBOURS = 5


def site_split(groups: np.ndarray, seed: int) -> np.ndarray:
    """A boolean mask over the normals: True for the site half (A), by patient group, seeded."""
    keys = np.unique(groups)
    rng = np.random.default_rng(seed)
    site = set(rng.permutation(keys)[: len(keys) // 2].tolist())
    return np.array([g in site for g in groups])


def knn_score(ref: np.ndarray, x: np.ndarray, k: int = K_NEIGHBOURS) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=min(k, len(ref))).fit(ref).kneighbors(x)[0].mean(1)


def summarise(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def measure(det: Any, e: dict[str, np.ndarray], groups: np.ndarray, splits: int) -> dict[str, Any]:
    from inference.api import conformal_threshold
    from inference.svdd import SVDDBoundary
    from training.metrics import auroc

    b = det.boundary
    train, normals, anomalies = e["boundary_train"], e["test_normal"], e["test_anomaly"]

    def refit(x: np.ndarray) -> SVDDBoundary:
        return SVDDBoundary(gamma=b.gamma, nu=b.nu, gamma_is_relative=b.gamma_is_relative,
                            score_form=b.score_form, whiten=b.whiten).fit(x)

    control = refit(train)
    bundled_n, bundled_a = b.score(normals), b.score(anomalies)
    control_n, control_a = control.score(normals), control.score(anomalies)
    control_gap = float(max(np.abs(control_n - bundled_n).max(), np.abs(control_a - bundled_a).max()))
    space = b.kernel_space  # the bundled kernel's (whitened) space, for the k-NN references
    t_train, t_n, t_a = space(train), space(normals), space(anomalies)
    knn_train_n, knn_train_a = knn_score(t_train, t_n), knn_score(t_train, t_a)  # the same for every split
    rows: dict[str, list[float]] = {}
    op: dict[str, list[float]] = {}
    n_site: list[int] = []

    def add(name: str, s_eval: np.ndarray, s_anom: np.ndarray) -> None:
        y = np.r_[np.zeros(len(s_eval)), np.ones(len(s_anom))]
        rows.setdefault(name, []).append(auroc(np.r_[s_eval, s_anom], y))

    for seed in range(splits):
        site = site_split(groups, seed)
        a, ev = normals[site], ~site
        n_site.append(int(site.sum()))
        add("bundled", bundled_n[ev], bundled_a)
        add("refit, training set", control_n[ev], control_a)
        u = refit(np.concatenate([train, a]))
        add("refit, training set + A", u.score(normals)[ev], u.score(anomalies))
        w = refit(np.concatenate([train, np.repeat(a, max(1, round(len(train) / len(a))), axis=0)]))
        add("refit, training set + A weighted", w.score(normals)[ev], w.score(anomalies))
        add("k-NN, training set", knn_train_n[ev], knn_train_a)
        for name, ref in (("k-NN, A", t_n[site]), ("k-NN, training set + A", np.concatenate([t_train, t_n[site]]))):
            add(name, knn_score(ref, t_n[ev]), knn_score(ref, t_a))
        site_thr = conformal_threshold(bundled_n[site], det.target_fpr)
        for name, thr in (("bundled threshold", float(det.threshold)), ("threshold calibrated on A", site_thr)):
            op.setdefault(f"{name}: FPR on E", []).append(float((bundled_n[ev] > thr).mean()))
            op.setdefault(f"{name}: TPR", []).append(float((bundled_a > thr).mean()))
    return {"auroc": {k: summarise(v) for k, v in rows.items()},
            "operating_point": {k: summarise(v) for k, v in op.items()},
            "auroc_bundled_whole_test": auroc(np.r_[bundled_n, bundled_a],
                                              np.r_[np.zeros(len(bundled_n)), np.ones(len(bundled_a))]),
            "control_max_abs_score_difference": control_gap,
            "n_site_normals": summarise([float(n) for n in n_site]),
            "n_test_normals": int(len(normals)), "n_test_anomalies": int(len(anomalies)),
            "n_boundary_train": int(len(train)), "target_fpr": float(det.target_fpr)}


def write_md(res: dict[str, Any], path: Path) -> str:
    m = res["measured"]
    ns = m["n_site_normals"]
    lines = [
        f"# Site normals, encoder fixed: `{res['model']}` on {res['dataset']}", "",
        f"The TEST split plays a site: its {m['n_test_normals']} normals split by patient group (an image is its "
        f"own group where the manifest has none) into site "
        f"normals A ({ns['min']:.0f}-{ns['max']:.0f}) and evaluation normals E, {res['splits']} times (seeds 0-"
        f"{res['splits'] - 1}); every figure is on E against all {m['n_test_anomalies']} test anomalies, mean "
        f"± sd over the splits. Each refit is the model's RBF SVDD (gamma {res['gamma']:.4g}, nu {res['nu']:.3f}, "
        f"{'whitened' if res['whiten'] else 'standardised'}); its training set is the model's own boundary "
        f"training set ({m['n_boundary_train']} embeddings). Generated by `{res['command']}` in "
        f"{res['seconds']:.0f} s (see the script's docstring).", "",
        f"Control: the refit on the training set alone reproduces the bundled scores to "
        f"{m['control_max_abs_score_difference']:.2g} (largest difference). Bundled AUROC on the whole test "
        f"split: {m['auroc_bundled_whole_test']:.3f}.", "",
        "| reference of normals | AUROC E vs anomalies | min-max over splits |", "| --- | --- | --- |"]
    for name, s in m["auroc"].items():
        lines.append(f"| {name} | {s['mean']:.3f} ± {s['std']:.3f} | {s['min']:.3f}-{s['max']:.3f} |")
    lines += ["", f"Operating point of the bundled scores (target FPR {m['target_fpr']:g}):", "",
              "| threshold | FPR on E | TPR |", "| --- | --- | --- |"]
    for name in ("bundled threshold", "threshold calibrated on A"):
        f, t = m["operating_point"][f"{name}: FPR on E"], m["operating_point"][f"{name}: TPR"]
        lines.append(f"| {name} | {f['mean']:.3f} ± {f['std']:.3f} | {t['mean']:.3f} ± {t['std']:.3f} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = model_parser(__doc__.splitlines()[0], "(always on: this script reads the test split)")
    ap.add_argument("--splits", type=int, default=20, help="random site / evaluation splits of the test normals")
    ns = ap.parse_args(argv)
    t0 = time.time()
    det, args = load_with_training_args(ns)
    with tempfile.TemporaryDirectory(prefix="site-adaptation-") as tmp:
        e = embeddings(det, ns.dataset, ns.data_root, ns.cache or Path(tmp), args, test=True)
    from training.manifest import read_manifest

    rows = read_manifest(ns.data_root / ns.dataset / "manifest.csv")
    groups = np.array([r.group or str(r.path) for r in rows if r.split == "test" and r.is_normal])
    if len(groups) != len(e["test_normal"]):
        raise SystemExit("the test normals' groups do not match their embeddings")
    command = f"python benchmarks/site_adaptation.py --dataset {ns.dataset}" + (
        f" --model <the {det.card.name} {det.card.version} folder>" if ns.model else "") + (
        f" --splits {ns.splits}" if ns.splits != 20 else "")
    res = {"model": f"{det.card.name} {det.card.version}", "dataset": ns.dataset, "splits": ns.splits,
           "gamma": float(det.boundary.gamma), "nu": float(det.boundary.nu), "whiten": bool(det.boundary.whiten),
           "measured": measure(det, e, groups, ns.splits), "command": command}
    res["seconds"] = round(time.time() - t0, 1)
    write_results(res, ns.out / f"site_adaptation-{ns.dataset}", write_md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
