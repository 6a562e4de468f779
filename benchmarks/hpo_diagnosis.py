"""What the label-free gamma/nu search of a bundled MedGRU-SVC model can and cannot choose.

    MEDGRU_DATA_ROOT=<data> python benchmarks/hpo_diagnosis.py --dataset brain_mri \\
        [--model inference/bundled/brain-mr] [--cache DIR] [--out benchmarks/results]

Two runs of one recipe pick very different kernel widths (chest: gamma 0.0115 and 0.187; brain: 0.205,
0.011 and 0.021) and differ on test by about 0.01. This asks what that choice changes. With the model's
trained encoder held fixed, it rebuilds the model's own split of the TRAIN-split normals (``group_split``
with the seed and fractions in its ``training.json``: fit / HPO / calibration shares), embeds them as
acquired, and embeds 500 random TRAIN-split anomalies (seed 0). The test split is read only with
``--test-sensitivity`` (below). The anomaly labels score; they choose nothing.

It reports:

* **rejection**: the share of each set outside the model's boundary, against nu and against the
  consistency bound ``nu + 2 sqrt(nu (1 - nu) / n)`` that the ``consistent-volume`` objective asks of the
  HPO share;
* **half fit**: the boundary refit (model's nu) on a random half of the fit normals, for gamma over the
  search range: rejection of that half, of the other half (normals the encoder was trained on, the
  boundary not), of the HPO and calibration shares, and the AUROC calibration normals vs anomalies;
* **gamma sweep**: the same on all fit normals (what the HPO's gamma changes), and a **nu sweep** at the
  model's gamma;
* **spectrum**: Mahalanobis scores on the top-k principal components of the fit embeddings and on the
  rest (the low-variance directions), and the Ledoit-Wolf Mahalanobis distance on all of them;
* **learning curve**: the AUROC with the boundary fit on 50 %, 75 % and 100 % of the fit normals, and
  on the fit plus HPO normals.

``--test-sensitivity`` also embeds the TEST split and reports the test AUROC along the gamma and nu sweeps:
how much the search's choice moves the figure that is reported. A sensitivity measured once, after the
models were bundled; nothing is chosen by it.

Writes ``hpo_diagnosis-<dataset>.md`` and ``.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.recipe_selection import auroc  # noqa: E402
from inference.detectors.medgru_svc import consistency_bound  # noqa: E402

BUNDLED = {"kermany_cxr": "chest-cxr", "brain_mri": "brain-mr"}
#: the optuna search range of gamma in ``MedGRUSVC._tune_boundary`` (relative: the kernel is gamma / d)
GAMMAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
#: nu over the search range (0.01 to ``--nu-max`` 0.2 in the bundled commands)
NUS = (0.01, 0.03, 0.05, 0.1, 0.15, 0.2)


def rejected(boundary: Any, e: np.ndarray) -> float:
    return float((boundary.score(e) > 0).mean())


def half_fit(e: dict[str, np.ndarray], nu: float, seed: int = 1) -> list[dict[str, float]]:
    """The boundary refit on a random half of the fit normals, for each gamma of :data:`GAMMAS`."""
    from inference.svdd import SVDDBoundary

    idx = np.random.default_rng(seed).permutation(len(e["fit"]))
    a, b = e["fit"][idx[:len(idx) // 2]], e["fit"][idx[len(idx) // 2:]]
    out = []
    for g in GAMMAS:
        bd = SVDDBoundary(gamma=g, nu=nu, whiten=True).fit(a)
        out.append({"gamma": g, "this_half": rejected(bd, a), "other_half": rejected(bd, b),
                    "hpo": rejected(bd, e["hpo"]), "cal": rejected(bd, e["cal"]),
                    "auroc_cal_vs_anomalies": auroc(bd.score(e["cal"]), bd.score(e["anom"]))})
    return out


def test_auroc(boundary: Any, e: dict[str, np.ndarray]) -> dict[str, float]:
    """``{"auroc_test": ...}`` where the test split was embedded (``--test-sensitivity``), else ``{}``."""
    if "test_normal" not in e:
        return {}
    return {"auroc_test": auroc(boundary.score(e["test_normal"]), boundary.score(e["test_anomaly"]))}


def sweep(e: dict[str, np.ndarray], gamma: float, nu: float, key: str) -> list[dict[str, float]]:
    """The boundary on its training set (``boundary_train``: the fit normals, with the model's re-framed
    copies where it had them), ``key`` ("gamma" or "nu") over its search range, the other the model's."""
    from inference.svdd import SVDDBoundary

    out = []
    for v in {"gamma": GAMMAS, "nu": NUS}[key]:
        g, n = (v, nu) if key == "gamma" else (gamma, v)
        bd = SVDDBoundary(gamma=g, nu=n, whiten=True).fit(e["boundary_train"])
        out.append({key: v, "fit": rejected(bd, e["fit"]), "hpo": rejected(bd, e["hpo"]),
                    "cal": rejected(bd, e["cal"]), "support_vectors": int(len(bd.support_vectors_)),
                    "auroc_cal_vs_anomalies": auroc(bd.score(e["cal"]), bd.score(e["anom"])),
                    **test_auroc(bd, e)})
    return out


def spectrum(e: dict[str, np.ndarray]) -> dict[str, Any]:
    """Mahalanobis AUROC (calibration normals vs anomalies) on the top-k principal components of the fit
    embeddings and on the remaining (low-variance) ones; Ledoit-Wolf Mahalanobis on all."""
    from sklearn.covariance import LedoitWolf

    fit = e["fit"]
    mu = fit.mean(0)
    _, s, vt = np.linalg.svd(fit - mu, full_matrices=False)
    var = s ** 2 / (len(fit) - 1)
    keep = var > var.max() * 1e-12

    def maha(x: np.ndarray, comps: slice) -> np.ndarray:
        z = (x - mu) @ vt[comps][keep[comps]].T / np.sqrt(var[comps][keep[comps]])
        return (z ** 2).sum(1)

    d = int(keep.sum())
    cum = np.cumsum(var) / var.sum()
    rows = []
    for k in (4, 8, 16, 32, 64, 128, 256):
        if k >= d:
            break
        rows.append({"k": k, "top_k": auroc(maha(e["cal"], slice(0, k)), maha(e["anom"], slice(0, k))),
                     "rest": auroc(maha(e["cal"], slice(k, None)), maha(e["anom"], slice(k, None)))})
    prec = LedoitWolf().fit(fit).precision_
    lw = [np.einsum("ij,jk,ik->i", x - mu, prec, x - mu) for x in (e["cal"], e["anom"])]
    return {"dims": int(fit.shape[1]), "rank": d,
            "components_for_variance": {str(q): int(np.searchsorted(cum, q) + 1) for q in (0.9, 0.95, 0.99)},
            "rows": rows, "ledoit_wolf_mahalanobis": auroc(*lw)}


def learning_curve(e: dict[str, np.ndarray], gamma: float, nu: float) -> list[dict[str, Any]]:
    from inference.svdd import SVDDBoundary

    out = []
    for frac in (0.5, 0.75, 1.0):
        n = int(round(frac * len(e["fit"])))
        vals = []
        for s in range(3 if frac < 1 else 1):
            idx = np.random.default_rng(s).permutation(len(e["fit"]))[:n]
            bd = SVDDBoundary(gamma=gamma, nu=nu, whiten=True).fit(e["fit"][idx])
            vals.append(auroc(bd.score(e["cal"]), bd.score(e["anom"])))
        out.append({"boundary_fit_on": f"{frac:.0%} of the fit normals", "n": n, "auroc": vals})
    both = np.r_[e["fit"], e["hpo"]]
    bd = SVDDBoundary(gamma=gamma, nu=nu, whiten=True).fit(both)
    out.append({"boundary_fit_on": "fit + HPO normals", "n": int(len(both)),
                "auroc": [auroc(bd.score(e["cal"]), bd.score(e["anom"]))]})
    return out


def embeddings(det: Any, dataset: str, data_root: Path, cache_dir: Path, args: dict[str, Any],
               test: bool = False, reframed: bool = False) -> dict[str, np.ndarray]:
    """The model's fit / HPO / calibration normals (its own ``group_split``) and 500 train anomalies;
    with ``test`` also the test split's normals and anomalies; with ``reframed`` also the calibration
    normals and the anomalies each randomly re-framed once (``cal_r``, ``anom_r``: framing carries no
    label there; the seeds of ``recipe_selection.py --reframe``)."""
    from training.manifest import read_manifest
    from training.train import FeatureCache, group_split

    rows = read_manifest(data_root / dataset / "manifest.csv")
    normals = [r for r in rows if r.split == "train" and r.is_normal]
    if int(args.get("max_normals") or 0):
        raise SystemExit("the model was trained on a subsample of the normals (--max-normals): not rebuilt here")
    fit, hpo, cal = group_split(normals, [float(args["hpo_fraction"]), float(args["calibration_fraction"])],
                                int(args["seed"]))
    anomalies = [r for r in rows if r.split == "train" and not r.is_normal]
    anomalies = [anomalies[i] for i in sorted(np.random.default_rng(0).choice(len(anomalies), 500, replace=False))]
    sets = [("fit", fit), ("hpo", hpo), ("cal", cal), ("anom", anomalies)]
    if test:
        sets += [("test_normal", [r for r in rows if r.split == "test" and r.is_normal]),
                 ("test_anomaly", [r for r in rows if r.split == "test" and not r.is_normal])]
    cache = FeatureCache(cache_dir, det)
    out = {k: det.embed_features(cache.features(v, desc=k)) for k, v in sets}
    if reframed:
        out["cal_r"] = det.embed_features(cache.features(cal, reframe_seed=101, desc="cal reframed"))
        out["anom_r"] = det.embed_features(cache.features(anomalies, reframe_seed=102, desc="anomalies reframed"))
    copies = int(args.get("reframe_copies") or 0)
    out["boundary_train"] = out["fit"]
    if copies:  # the model's boundary saw the fit normals plus their re-framed copies (medgru train's seeds)
        from inference.augment import ReframeParams, reframe_copy_seed

        params = ReframeParams.from_options(args)
        out["boundary_train"] = np.concatenate([out["fit"], *(det.embed_features(cache.features(
            fit, reframe_seed=reframe_copy_seed(int(args["seed"]), k), reframe_params=params, desc="fit reframed"))
            for k in range(copies))])
    return out


def write_md(res: dict[str, Any], path: Path) -> str:
    b = res["bundled_boundary"]
    lines = [
        f"# What the label-free gamma/nu search changes: `{res['model']}` on {res['dataset']}", "",
        f"The model's trained encoder, held fixed; its own split of the TRAIN-split normals ({res['n']['fit']} fit, "
        f"{res['n']['hpo']} HPO, {res['n']['cal']} calibration; the fit normals as acquired) and "
        f"{res['n']['anom']} random TRAIN-split anomalies (seed 0)"
        f"{'; TEST split only for the last column (a sensitivity)' if 'test_normal' in res['n'] else '; no test image'}"
        ". Embedding dimension "
        f"{res['spectrum']['dims']}. Generated by `benchmarks/hpo_diagnosis.py` in {res['seconds']:.0f} s "
        "(see its docstring). The anomaly labels score; they choose nothing.", "",
        *([f"The model's boundary was fit on the fit normals plus {res['reframe_copies']} re-framed copies of each; "
           "so are its refits in the gamma and nu sweeps; the half fit, the spectrum and the learning curve use the "
           "fit normals as acquired.", ""] if res["reframe_copies"] else []),
        f"## The model's boundary (gamma {res['gamma']:.4g}, nu {res['nu']:.3f})", "",
        "| set | n | rejected |", "| --- | --- | --- |"]
    for k in ("fit", "hpo", "cal", "anom"):
        lines.append(f"| {res['names'][k]} | {res['n'][k]} | {b[k]:.3f} |")
    lines += ["", f"Consistency bound on the HPO share (nu + 2 sd): {b['consistency_bound']:.3f}; the HPO share "
              f"{'meets' if b['hpo'] <= b['consistency_bound'] else 'exceeds'} it. AUROC calibration normals vs "
              f"anomalies: {b['auroc_cal_vs_anomalies']:.3f}"
              + (f"; TEST AUROC {b['auroc_test']:.3f}" if "auroc_test" in b else "") + ".", "",
              "## Boundary refit on half the fit normals (model's nu)", "",
              "| gamma | rejected: this half | other half | HPO | calibration | AUROC cal vs anomalies |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in res["half_fit"]:
        lines.append(f"| {r['gamma']:g} | {r['this_half']:.3f} | {r['other_half']:.3f} | {r['hpo']:.3f} | "
                     f"{r['cal']:.3f} | {r['auroc_cal_vs_anomalies']:.3f} |")
    test = "auroc_test" in res["gamma_sweep"][0]
    for key, what, fixed in (("gamma", "Gamma", "nu"), ("nu", "Nu", "gamma")):
        lines += ["", f"## {what} over the search range (boundary on its whole training set, model's {fixed})", "",
                  f"| {key} | rejected: fit | HPO | calibration | support vectors | AUROC cal vs anomalies |"
                  + (" TEST AUROC (sensitivity) |" if test else ""),
                  "| --- | --- | --- | --- | --- | --- |" + (" --- |" if test else "")]
        for r in res[f"{key}_sweep"]:
            lines.append(f"| {r[key]:g} | {r['fit']:.3f} | {r['hpo']:.3f} | {r['cal']:.3f} | "
                         f"{r['support_vectors']} | {r['auroc_cal_vs_anomalies']:.3f} |"
                         + (f" {r['auroc_test']:.3f} |" if test else ""))
    sp = res["spectrum"]
    cv = sp["components_for_variance"]
    lines += ["", "## Where the signal lies: principal components of the fit embeddings", "",
              f"{cv['0.9']} / {cv['0.95']} / {cv['0.99']} of {sp['rank']} components hold 90 / 95 / 99 % of the "
              "variance. Mahalanobis AUROC (calibration normals vs anomalies):", "",
              "| k | top k components | the other components |", "| --- | --- | --- |"]
    for r in sp["rows"]:
        lines.append(f"| {r['k']} | {r['top_k']:.3f} | {r['rest']:.3f} |")
    lines += ["", f"Ledoit-Wolf Mahalanobis on all: {sp['ledoit_wolf_mahalanobis']:.3f}.", "",
              "## Learning curve of the boundary (model's gamma and nu)", "",
              "| boundary fit on | n | AUROC cal vs anomalies |", "| --- | --- | --- |"]
    for r in res["learning_curve"]:
        lines.append(f"| {r['boundary_fit_on']} | {r['n']} | {', '.join(f'{v:.3f}' for v in r['auroc'])} |")
    if test:
        lines += ["", f"TEST split: {res['n']['test_normal']} normals, {res['n']['test_anomaly']} anomalies; its AUROC "
                  "was read once, after the models were bundled, as a sensitivity. Nothing was chosen by it."]
    lines += ["", "Command:", "", f"    python benchmarks/hpo_diagnosis.py --dataset {res['dataset']}"
              + (" --test-sensitivity" if test else ""), ""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def write_results(res: dict[str, Any], stem: Path, write_md: Any) -> None:
    """``res`` as ``<stem>.json``, and as Markdown by ``write_md(res, path)`` into ``<stem>.md`` (printed)."""
    stem.parent.mkdir(parents=True, exist_ok=True)  # (not with_suffix: a stem may end in a version, "-8.0.0")
    stem.with_name(stem.name + ".json").write_text(json.dumps(res, indent=2) + "\n")
    print(write_md(res, stem.with_name(stem.name + ".md")))


def model_parser(description: str, test_help: str) -> argparse.ArgumentParser:
    """The options of the scripts that rebuild a model's own split: dataset, data root, model folder,
    cache, ``--test-sensitivity`` (``test_help``), threads, output folder."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--dataset", required=True, choices=tuple(BUNDLED))
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("MEDGRU_DATA_ROOT", "../shared/data")))
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled one)")
    ap.add_argument("--cache", type=Path, default=None, help="backbone-map cache (default: a temporary folder)")
    ap.add_argument("--test-sensitivity", action="store_true", help=test_help)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return ap


def load_with_training_args(ns: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The model of ``ns.model`` (default: the bundled one for ``ns.dataset``) and its ``medgru train``
    options (``training.json``), with torch set to ``ns.threads`` threads."""
    import torch

    from inference.api import load_model
    from training.evaluate import model_training_args

    torch.set_num_threads(ns.threads)
    model = ns.model or REPO / "inference" / "bundled" / BUNDLED[ns.dataset]
    args = model_training_args(model)
    if not args:
        raise SystemExit(f"{model} has no training.json: its split cannot be rebuilt")
    return load_model(model), args


def main(argv: list[str] | None = None) -> int:
    import tempfile

    ns = model_parser(__doc__.splitlines()[0], "also report the TEST AUROC along the gamma and nu sweeps (a "
                      "sensitivity; chooses nothing)").parse_args(argv)
    t0 = time.time()
    det, args = load_with_training_args(ns)
    with tempfile.TemporaryDirectory(prefix="hpo-diag-") as tmp:
        e = embeddings(det, ns.dataset, ns.data_root, ns.cache or Path(tmp), args, test=ns.test_sensitivity)
    b = det.boundary
    nu, gamma = float(det.nu), float(det.gamma)
    res: dict[str, Any] = {
        "model": f"{det.card.name} {det.card.version}", "dataset": ns.dataset, "gamma": gamma, "nu": nu,
        "n": {k: int(len(v)) for k, v in e.items()},  # boundary_train: fit + re-framed copies, if any
        "names": {"fit": "fit normals (the encoder's and boundary's training set)", "hpo": "HPO normals",
                  "cal": "calibration normals", "anom": "train anomalies"},
        "bundled_boundary": {**{k: rejected(b, v) for k, v in e.items() if k != "boundary_train"},
                             "consistency_bound": consistency_bound(nu, len(e["hpo"])),
                             "auroc_cal_vs_anomalies": auroc(b.score(e["cal"]), b.score(e["anom"])),
                             **test_auroc(b, e)},
        "fit_report_hpo": (det.fit_report or {}).get("hpo") if hasattr(det, "fit_report") else None,
        "half_fit": half_fit(e, nu), "gamma_sweep": sweep(e, gamma, nu, "gamma"),
        "nu_sweep": sweep(e, gamma, nu, "nu"),
        "reframe_copies": int(args.get("reframe_copies") or 0), "spectrum": spectrum(e),
        "learning_curve": learning_curve(e, gamma, nu)}
    res["seconds"] = round(time.time() - t0, 1)
    write_results(res, ns.out / f"hpo_diagnosis-{ns.dataset}", write_md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
