"""Ablations of MedGRU-SVC on one protocol (train normals only; test AUROC measured once per variant).

    python benchmarks/ablations.py --dataset kermany_cxr [--clahe-off] [--epochs 20] \\
        [--cache DIR] [--out benchmarks/results]

Same splits, seeds, cached backbone maps and training recipe as ``medgru train`` (``training.train``):

* recurrence: ConvGRU vs ConvLSTM vs no recurrence (each: ConvGRU-style training, optuna SVDD, test AUROC);
* one-class head on the same ConvGRU embedding: RBF SVDD (the model) vs Gaussian mixture vs isolation
  forest vs local outlier factor (density) vs mean k-NN distance (DBSCAN-style core distance);
* reference: the same heads on global-average-pooled backbone maps (no ConvGRU);
* CLAHE on vs off (``--clahe-off`` recomputes the backbone maps without CLAHE: slow on CPU).

The ablation heads' own settings are fixed a priori (no tuning); nothing is tuned on test data.
Writes ``ablations-<dataset>.json`` and ``.md``, or ``ablations-<tag>-<dataset>.*`` with ``--tag`` (the
runs of each bundled recipe: ``ablations-v4-*``, ``-v5-*``, ``-v6-*``, ``-v7-*``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from medgru.settings import load_settings  # noqa: E402
from training import train as T  # noqa: E402
from training.manifest import split_rows  # noqa: E402

DATASET_SCOPE = {"kermany_cxr": ("CR,DX", "CHEST"), "brain_mri": ("MR", "BRAIN,HEAD")}


def _train_args(dataset: str, data_root: Path, cache: Path | None, extra: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    mods, parts = DATASET_SCOPE[dataset]
    argv = ["--manifest", str(data_root / dataset / "manifest.csv"), "--out", "/nonexistent",
            "--modalities", mods, "--body-parts", parts]
    if cache:
        argv += ["--cache", str(cache)]
    return p.parse_args(argv + extra)


def _heads(e_fit: np.ndarray, e_test: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    from sklearn.ensemble import IsolationForest
    from sklearn.mixture import GaussianMixture
    from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors

    mu, sd = e_fit.mean(0), e_fit.std(0) + 1e-6
    a, b = (e_fit - mu) / sd, (e_test - mu) / sd
    out: dict[str, np.ndarray] = {}
    best = None
    for k in (1, 2, 4, 8):
        g = GaussianMixture(k, covariance_type="full", reg_covar=1e-3, random_state=seed).fit(a)
        bic = g.bic(a)
        if best is None or bic < best[0]:
            best = (bic, g)
    out[f"GMM (BIC, {best[1].n_components} comp.)"] = -best[1].score_samples(b)
    out["isolation forest"] = -IsolationForest(n_estimators=300, random_state=seed).fit(a).score_samples(b)
    out["LOF (k=20, density)"] = -LocalOutlierFactor(n_neighbors=20, novelty=True).fit(a).score_samples(b)
    d, _ = NearestNeighbors(n_neighbors=5).fit(a).kneighbors(b)
    out["k-NN core distance (k=5, DBSCAN-style)"] = d.mean(1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(DATASET_SCOPE), default="kermany_cxr")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--clahe-off", action="store_true", help="also run without CLAHE (recomputes features)")
    ap.add_argument("--cells", default="convgru,convlstm,none")
    ap.add_argument("--only-clahe", action="store_true",
                    help="run only the CLAHE-off variant (writes ablations-<dataset>-clahe.*)")
    ap.add_argument("--tag", default="",
                    help="recipe tag in the output names: ablations-<tag>-<dataset>.* (e.g. v7)")
    ap.add_argument("train_args", nargs=argparse.REMAINDER,
                    help="extra medgru train options after --, e.g. -- --epochs 20 --synthetic-max 300")
    ns = ap.parse_args(argv)
    extra = [a for a in ns.train_args if a != "--"]
    settings = load_settings()
    if settings.data_root is None:
        raise SystemExit("set MEDGRU_DATA_ROOT (settings.data_root) to the benchmark data folder")
    data_root = Path(settings.data_root)
    t0 = time.time()
    results: dict = {"dataset": ns.dataset, "protocol": "train normals only; test AUROC once per variant",
                     "train_options": extra, "rows": []}

    def add(group: str, variant: str, auroc: float, note: str = "") -> None:
        results["rows"].append({"group": group, "variant": variant, "test_auroc": round(float(auroc), 4),
                                "note": note})
        print(f"{group:12s} {variant:45s} {auroc:.4f} {note}", flush=True)

    args = _train_args(ns.dataset, data_root, ns.cache, extra)
    T._seed_everything(args.seed)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    prep = T.prepare(args, settings)
    f = prep.features
    test_rows = split_rows(prep.rows, "test")
    f_test = prep.cache.features(test_rows, desc="test report")
    y = np.array([0 if r.is_normal else 1 for r in test_rows])

    from sklearn.metrics import roc_auc_score

    dets = {}
    cells = [] if ns.only_clahe else [c.strip() for c in ns.cells.split(",") if c.strip()]
    if ns.only_clahe:
        ns.clahe_off = True
    for cell in cells:
        a = _train_args(ns.dataset, data_root, ns.cache, extra + ["--cell", cell])
        det = T.detector_from_args(a)
        det.fit_features(f["fit"], f["fit_syn"], f["hpo"], f["hpo_syn"], f["cal"], seed=args.seed)
        dets[cell] = det
        s = det.score_features(f_test)
        add("recurrence", f"{cell} + SVDD", roc_auc_score(y, s),
            f"val normal-vs-synthetic AUROC {det.fit_report.get('hpo_auroc_normal_vs_synthetic', float('nan')):.3f}")

    base = dets.get("convgru")
    if base is not None:
        e_fit, e_test = base.embed_features(f["fit"]), base.embed_features(f_test)
        add("head", "RBF SVDD (optuna gamma, nu) [model]", roc_auc_score(y, base.boundary.score(e_test)))
        for name, s in _heads(e_fit, e_test, args.seed).items():
            add("head", name, roc_auc_score(y, s))
    # reference: no ConvGRU at all, GAP of the frozen backbone maps
    if ns.only_clahe:
        pass
    else:
        _references(f, f_test, y, args.seed, add)

    if ns.clahe_off:
        a = _train_args(ns.dataset, data_root, ns.cache, extra + ["--clip-limit", "0"])
        prep0 = T.prepare(a, settings)
        f0 = prep0.features
        det = T.detector_from_args(a)
        det.fit_features(f0["fit"], f0["fit_syn"], f0["hpo"], f0["hpo_syn"], f0["cal"], seed=a.seed)
        s = det.score_features(prep0.cache.features(test_rows, desc="test report"))
        add("clahe", "CLAHE off (convgru + SVDD)", roc_auc_score(y, s),
            f"val normal-vs-synthetic AUROC {det.fit_report.get('hpo_auroc_normal_vs_synthetic', float('nan')):.3f}")
        if base is not None:
            add("clahe", "CLAHE on (convgru + SVDD) [model]", roc_auc_score(y, base.score_features(f_test)))

    _write(ns, results, args, t0, extra)
    return 0


def _references(f, f_test, y, seed, add) -> None:
    from sklearn.metrics import roc_auc_score

    g_fit = f["fit"][:, -1].float().mean(dim=(-2, -1)).double().numpy()
    g_test = f_test[:, -1].float().mean(dim=(-2, -1)).double().numpy()
    from inference.svdd import SVDDBoundary

    add("reference", "GAP(backbone) + RBF SVDD (gamma=1, nu=0.1)",
        roc_auc_score(y, SVDDBoundary(1.0, 0.1).fit(g_fit).score(g_test)), "no ConvGRU, untuned")
    for name, s in _heads(g_fit, g_test, seed).items():
        add("reference", f"GAP(backbone) + {name}", roc_auc_score(y, s), "no ConvGRU")


def _write(ns, results, args, t0, extra) -> None:
    results["seconds"] = round(time.time() - t0, 1)
    cmd = "python benchmarks/ablations.py " + " ".join(
        [f"--dataset {ns.dataset}"] + (["--only-clahe"] if ns.only_clahe else ["--clahe-off"] if ns.clahe_off else [])
        + ([f"--cells {ns.cells}"] if ns.cells != "convgru,convlstm,none" else [])
        + ([f"--tag {ns.tag}"] if ns.tag else []) + (["--"] + extra if extra else []))
    results["command"] = cmd
    ns.out.mkdir(parents=True, exist_ok=True)
    tag = f"{ns.dataset}-clahe" if ns.only_clahe else ns.dataset
    if ns.tag:
        tag = f"{ns.tag}-{tag}"
    (ns.out / f"ablations-{tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    write_md(results, args, ns.out / f"ablations-{tag}.md")


def protocol(args: argparse.Namespace) -> str:
    """The protocol sentence of the report, from the ``medgru train`` options the run used."""
    fit = "the train split's normals only"
    if getattr(args, "reframe_copies", 0):
        fit += f", plus {args.reframe_copies} randomly re-framed copies of each fit normal"
    enc = ("the ConvGRU trained to rebuild its input's backbone map (normals only)" if args.loss.startswith("reconstruct")
           else "synthetic anomalies for the encoder's outlier exposure")
    hpo = ("SVDD gamma and nu by optuna on held-out normals vs synthetic anomalies"
           if args.hpo_objective == "synthetic-auroc"
           else f"SVDD gamma and nu by optuna, label-free ({args.hpo_objective})")
    return (f"Protocol: fit on {fit} (grouped fit / HPO / calibration shares, seed {args.seed}); {enc}; {hpo}; "
            "test AUROC measured once per variant (no variant was tuned on test).")


def write_md(results: dict, args: argparse.Namespace, path: Path) -> None:
    lines = [f"# MedGRU-SVC ablations on {results['dataset']}", "",
             f"{protocol(args)} CPU run, {results['seconds']:.0f} s.", "",
             "Command (data root from `MEDGRU_DATA_ROOT`):", "",
             f"    {results['command']}", "", "| group | variant | test AUROC | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['group']} | {r['variant']} | {r['test_auroc']:.4f} | {r['note']} |" for r in results["rows"]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
