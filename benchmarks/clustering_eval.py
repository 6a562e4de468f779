"""Does support-vector clustering name tumour types? Fixed ``cluster_gamma=1.0`` vs the label-free choice.

    MEDGRU_DATA_ROOT=<data> python benchmarks/clustering_eval.py [--data-root DIR] \\
        [--model inference/bundled/brain-mr] [--cache DIR] [--out benchmarks/results]

A report, not a test, and not a tuning signal: the tumour labels are used only to score the clusters.

1. Loads the committed model (:func:`inference.api.load_model`) and embeds, batched, the brain MRI
   ``test`` split's tumour images and all ``train`` split images (per image: ``det.preprocess`` ->
   ``det.frame_features`` -> ``det.embed_features``, i.e. :meth:`MedGRUSVC.sequence_features` for a
   one-frame sequence, batched).
2. Pool A, the test tumours: :func:`inference.svdd.support_vector_clustering` with the model's
   ``cluster_nu`` / ``cluster_k`` at ``gamma = 1.0`` (the old default) and at
   :func:`inference.svdd.choose_cluster_gamma`'s choice.
3. Pool B, mimicking ``medgru train --cluster-pool unlabelled``: the train split's images, labels
   ignored, that the model's boundary puts outside its threshold, clustered by the detector's own
   ``_fit_clusters`` with ``cluster_gamma = 1.0`` and ``"auto"``.
4. For each: number of clusters, sizes, the adjusted Rand index (ARI) and the contingency table against
   the true class. A reference that *uses the number of classes*: k-means with that many clusters
   (does the embedding separate the classes at all?).

Writes ``clustering-<dataset>.md`` and ``.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATASET = "brain_mri"


def embed_rows(det: Any, rows: Sequence[Any], *, batch: int = 32, workers: int = 2) -> np.ndarray:
    """``(N, hidden)`` embeddings of one-frame manifest rows, ``batch`` images per backbone call."""
    from training.manifest import load_sequences

    out = []
    t0 = time.time()
    for i in range(0, len(rows), batch):
        seqs = load_sequences(rows[i:i + batch], workers=workers)
        frames = np.concatenate([det.preprocess(s) for s in seqs])  # (B, S, S): T = 1 each
        maps = det.frame_features(frames)[:, None]  # (B, 1, C, h, w), as sequence_features per image
        out.append(det.embed_features(maps))
        if (i // batch) % 20 == 0:
            print(f"  embedded {i + len(seqs)}/{len(rows)} ({time.time() - t0:.0f} s)", flush=True)
    return np.concatenate(out) if out else np.zeros((0, det.hidden_channels))


def cached_embeddings(det: Any, rows: Sequence[Any], name: str, cache: Path | None, **kw: Any) -> np.ndarray:
    """Embeddings of ``rows``, read from / written to ``cache/<name>.npz`` when a cache is given (keyed by
    the rows' paths and the model's encoder file)."""
    import hashlib

    files = json.dumps(getattr(det.card, "files", {}) or {}, sort_keys=True)
    key = hashlib.sha256(("\n".join(str(r.path) for r in rows) + files).encode()).hexdigest()[:16]
    path = cache / f"{name}-{key}.npz" if cache else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return z["e"]
    e = embed_rows(det, rows, **kw)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, e=e)
    return e


def contingency(truth: Sequence[str], labels: np.ndarray) -> dict[str, dict[str, int]]:
    classes = sorted(set(truth))
    return {f"cluster-{c + 1}": {t: int(sum(1 for tt, ll in zip(truth, labels) if ll == c and tt == t))
                                 for t in classes}
            for c in range(int(labels.max()) + 1)}


def summarise(truth: Sequence[str], labels: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    return {"n": int(len(labels)), "clusters": int(labels.max()) + 1,
            "sizes": [int(v) for v in np.bincount(labels)],
            "ari": round(float(adjusted_rand_score(truth, labels)), 4),
            "ami": round(float(adjusted_mutual_info_score(truth, labels)), 4),
            "contingency": contingency(truth, labels)}


def kmeans_reference(x: np.ndarray, truth: Sequence[str], seed: int = 0) -> dict[str, Any]:
    from sklearn.cluster import KMeans

    xs = (x - x.mean(0)) / (x.std(0) + 1e-6)
    k = len(set(truth))
    labels = KMeans(k, n_init=10, random_state=seed).fit_predict(xs)
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")  # name by decreasing size
    remap = np.empty(k, np.int64)
    remap[order] = np.arange(k)
    return summarise(truth, remap[labels])


def knn_agreement(x: np.ndarray, truth: Sequence[str], k: int = 10) -> dict[str, float]:
    """Share of each point's ``k`` nearest neighbours (standardised space) with its class, and chance."""
    from sklearn.neighbors import NearestNeighbors

    y = np.asarray(truth)
    xs = (x - x.mean(0)) / (x.std(0) + 1e-6)
    idx = NearestNeighbors(n_neighbors=k + 1).fit(xs).kneighbors(xs, return_distance=False)[:, 1:]
    chance = float(sum((y == c).mean() ** 2 for c in set(truth)))
    return {"agreement": round(float((y[idx] == y[:, None]).mean()), 4), "chance": round(chance, 4)}


def gamma_sweep(x: np.ndarray, truth: Sequence[str], gammas: Sequence[float], nu: float, k: int
                ) -> list[dict[str, Any]]:
    """ARI of the SVC labelling at every gamma of the grid (uses the labels: a report, never a choice)."""
    from sklearn.metrics import adjusted_rand_score

    from inference.svdd import support_vector_clustering

    out = []
    for g in gammas:
        m = support_vector_clustering(x, gamma=g, nu=nu, k=k)
        out.append({"gamma": float(g), "clusters": len(m.names),
                    "sizes": [int(v) for v in np.bincount(m.labels)],
                    "ari": round(float(adjusted_rand_score(truth, m.labels)), 4)})
    return out


def table_md(res: dict[str, Any]) -> list[str]:
    classes = sorted(next(iter(res["contingency"].values())).keys())
    lines = ["| cluster | " + " | ".join(classes) + " | total |", "|---" * (len(classes) + 2) + "|"]
    for name, row in res["contingency"].items():
        lines.append(f"| {name} | " + " | ".join(str(row[c]) for c in classes) + f" | {sum(row.values())} |")
    return lines


def trace_md(trace: dict[str, Any], sweep: list[dict[str, Any]]) -> list[str]:
    lines = ["| gamma | clusters counted (>= min size, coverage >= min) | component sizes | coverage (of inside) | "
             "outside sphere | labelling at this gamma: clusters, ARI (labels used) |", "|---|---|---|---|---|---|"]
    for t, w in zip(trace["per_gamma"], sweep):
        sizes = t["sizes"] if len(t["sizes"]) <= 6 else t["sizes"][:6] + ["..."]
        lines.append(f"| {t['gamma']:.3g} | {t['clusters']}{' (fragmented)' if t['fragmented'] else ''} | "
                     f"{sizes} | {t['coverage']:.2f} | {t['outside_fraction']:.2f} | {w['clusters']}, {w['ari']:.3f} |")
    return lines


LITERAL = "auto, one-gamma lifetime and no coverage floor"
SETTINGS = ("fixed gamma=1.0", "auto", LITERAL, "kmeans (k = number of classes, reference)")


def literal_rule(x: np.ndarray, truth: Sequence[str], nu: float, k: int) -> dict[str, Any]:
    """The lifetime rule without its two guards (``min_lifetime=1``, ``min_coverage=0``), for comparison."""
    from inference.svdd import choose_cluster_gamma, support_vector_clustering

    g, trace = choose_cluster_gamma(x, nu=nu, k=k, min_lifetime=1, min_coverage=0.0)
    m = support_vector_clustering(x, gamma=g, nu=nu, k=k)
    return {**summarise(truth, m.labels), "gamma": g, "reason": trace["reason"]}


def pool_md(name: str, pool: dict[str, Any]) -> list[str]:
    lines = [f"## Pool {name}: {pool['description']}", ""]
    if "outside" in pool:
        lines += [f"{pool['outside']} of {pool['train_images']} train images are outside the threshold; "
                  f"by (ignored) label: {pool['outside_by_label']}.", ""]
    knn = pool["knn_agreement"]
    lines += [f"Local class structure: {knn['agreement']:.3f} of each point's 10 nearest neighbours share its "
              f"class (chance {knn['chance']:.3f}).", "",
              "| setting | gamma | clusters | sizes | ARI | AMI |", "|---|---|---|---|---|---|"]
    for s in SETTINGS:
        r = pool[s]
        g = f"{r['gamma']:.3g}" if "gamma" in r else "-"
        lines.append(f"| {s} | {g} | {r['clusters']} | {r['sizes']} | {r['ari']:.3f} | {r['ami']:.3f} |")
    lines += ["", f"Auto choice: {pool['auto']['trace']['reason']} (min cluster size "
              f"{pool['auto']['trace']['min_cluster_size']}). Without the guards: {pool[LITERAL]['reason']}.", ""]
    lines += trace_md(pool["auto"]["trace"], pool["sweep"]) + [""]
    for s in SETTINGS:
        lines += [f"Contingency, {s}:", ""] + table_md(pool[s]) + [""]
    return lines


NOTES_HEADING = "## Reading"


def write_md(out: dict[str, Any], path: Path) -> None:
    lines = [f"# Support-vector clustering of {out['dataset']} anomalies: fixed vs label-free kernel width", "",
             f"Model `{out['model']}` {out.get('model_version', '')}, SVC `nu = {out['cluster_nu']}`, `k = {out['cluster_k']}`; "
             f"embeddings {out['embed_seconds']:.0f} s, everything {out['seconds']:.0f} s on the CPU.",
             "Generated by `benchmarks/clustering_eval.py` (command below); the labels score the clusters "
             "and never choose anything. ARI / AMI: adjusted Rand index / adjusted mutual information against "
             "the true class (0 = chance, 1 = the classes).", ""]
    for name, pool in out["pools"].items():
        lines += pool_md(name, pool)
    lines += ["Command (data root from `MEDGRU_DATA_ROOT` or `--data-root`):", "",
              "    python benchmarks/clustering_eval.py --cache <embedding cache folder>", ""]
    notes = ""  # a hand-written "## Reading" section survives a re-run
    if path.is_file() and NOTES_HEADING in path.read_text():
        notes = NOTES_HEADING + path.read_text().split(NOTES_HEADING, 1)[1]
    path.write_text("\n".join(lines) + "\n" + notes)


def add_references(pool: dict[str, Any], e: np.ndarray, truth: list[str], nu: float, k: int,
                   started: float) -> None:
    """The label-scored references of one pool: the literal rule, k-means with the true k, k-NN class
    agreement, the per-gamma sweep, and the clustering time since ``started``."""
    from inference.svdd import DEFAULT_CLUSTER_GAMMAS

    pool[LITERAL] = literal_rule(e, truth, nu, k)
    pool["kmeans (k = number of classes, reference)"] = kmeans_reference(e, truth)
    pool["knn_agreement"] = knn_agreement(e, truth, k=10)
    pool["sweep"] = gamma_sweep(e, truth, DEFAULT_CLUSTER_GAMMAS, nu, k)
    pool["cluster_seconds"] = round(time.time() - started, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", type=Path, default=None,
                    help="benchmark data folder (default: $MEDGRU_DATA_ROOT)")
    ap.add_argument("--model", type=Path, default=REPO / "inference" / "bundled" / "brain-mr")
    ap.add_argument("--cache", type=Path, default=None, help="folder for the embeddings (re-runs skip the backbone)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="image loading threads")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ns = ap.parse_args(argv)
    root = ns.data_root or (Path(os.environ["MEDGRU_DATA_ROOT"]) if os.environ.get("MEDGRU_DATA_ROOT") else None)
    if root is None:
        raise SystemExit("give --data-root or set MEDGRU_DATA_ROOT to the benchmark data folder")

    import torch

    from inference.api import load_model
    from inference.svdd import DEFAULT_CLUSTER_GAMMAS, choose_cluster_gamma, support_vector_clustering
    from training.manifest import read_manifest, split_rows

    torch.set_num_threads(max(1, ns.threads))
    t0 = time.time()
    det = load_model(ns.model)
    rows = read_manifest(root / DATASET / "manifest.csv")
    test_tum = [r for r in split_rows(rows, "test") if not r.is_normal]
    train_all = split_rows(rows, "train")
    kw = {"batch": ns.batch, "workers": ns.workers}
    print(f"embedding {len(test_tum)} test tumour images", flush=True)
    e_test = cached_embeddings(det, test_tum, "test-tumours", ns.cache, **kw)
    print(f"embedding {len(train_all)} train images", flush=True)
    e_train = cached_embeddings(det, train_all, "train-all", ns.cache, **kw)
    t_embed = time.time() - t0

    nu, k = det.cluster_nu, det.cluster_k
    out: dict[str, Any] = {"dataset": DATASET, "model": det.card.name if det.card else ns.model.name,
                           "model_version": det.card.version if det.card else "", "cluster_nu": nu, "cluster_k": k,
                           "embed_seconds": round(t_embed, 1), "pools": {}}

    # pool A: the test tumours
    truth_a = [r.label for r in test_tum]
    pool_a: dict[str, Any] = {"description": "test split, tumour images (glioma / meningioma / pituitary)"}
    t1 = time.time()
    fixed = support_vector_clustering(e_test, gamma=1.0, nu=nu, k=k)
    pool_a["fixed gamma=1.0"] = {**summarise(truth_a, fixed.labels), "gamma": 1.0}
    g, trace = choose_cluster_gamma(e_test, nu=nu, k=k)
    auto = support_vector_clustering(e_test, gamma=g, nu=nu, k=k)
    pool_a["auto"] = {**summarise(truth_a, auto.labels), "gamma": g, "trace": trace}
    add_references(pool_a, e_test, truth_a, nu, k, t1)
    out["pools"]["A"] = pool_a

    # pool B: train split, labels ignored, outside the boundary's threshold (as medgru train does)
    scores = det.boundary.score(e_train)
    outside = scores > det.threshold
    truth_b = [r.label for r, o in zip(train_all, outside) if o]
    e_out = e_train[outside]
    pool_b: dict[str, Any] = {"description": "train split, labels ignored, boundary score > threshold "
                                             "(medgru train --cluster-pool unlabelled)",
                              "train_images": len(train_all), "outside": int(outside.sum()),
                              "outside_by_label": {lab: int(sum(1 for t in truth_b if t == lab))
                                                   for lab in sorted(set(r.label for r in train_all))}}
    t1 = time.time()
    # every image outside is clustered here (the model keeps a seeded subset of at most cluster_max_pool)
    pool_b["model_cluster_max_pool"] = det.cluster_max_pool
    det.cluster_max_pool = 0
    for name, setting in (("fixed gamma=1.0", 1.0), ("auto", "auto")):
        det.cluster_gamma = setting
        rep: dict[str, Any] = {}
        det._fit_clusters(e_train, rep)  # the training code path: it selects score > threshold itself
        assert det.clusters is not None and len(det.clusters.labels) == len(e_out)
        pool_b[name] = {**summarise(truth_b, det.clusters.labels), "gamma": det.clusters.gamma,
                        **({"trace": rep["clusters"]["trace"]} if "trace" in rep["clusters"] else {})}
    add_references(pool_b, e_out, truth_b, nu, k, t1)
    out["pools"]["B"] = pool_b
    out["seconds"] = round(time.time() - t0, 1)

    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / f"clustering-{DATASET}.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    write_md(out, ns.out / f"clustering-{DATASET}.md")
    for name, pool in out["pools"].items():
        for s in SETTINGS:
            r = pool[s]
            print(f"pool {name} {s:45s} clusters {r['clusters']} sizes {r['sizes']} ARI {r['ari']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
