"""Does any representation of the brain tumour images hold the tumour types as clusters?

    MEDGRU_DATA_ROOT=<data> python benchmarks/cluster_representations.py [--per-class 250] \\
        [--model inference/bundled/brain-mr] [--out benchmarks/results]

Support-vector clustering of the bundled models finds one cluster (``clustering-v6-brain_mri.md``): every
flagged image is ``cluster-1``. This asks whether that is the clustering's fault or the representation's.
For ``--per-class`` random TRAIN-split images of each tumour class (seed 0; the test split is not read) it
builds three representations and, in each, runs the model's own SVC (label-free kernel width,
:func:`inference.svdd.auto_support_vector_clustering`), k-means with the number of classes (a reference
that is told that number) and the share of each image's 10 nearest neighbours of its class:

* ``embedding``: the model's embedding (what its SVC clusters);
* ``backbone GAP``: the frozen backbone maps, averaged over positions (no ConvGRU);
* ``Grad-CAM pooled``: the backbone maps averaged with the model's Grad-CAM heat map as the weight, so
  the region that made the score, rather than the whole slice, describes the image.

Each is standardised per column. The labels score the clusters and never choose anything.
Writes ``clustering-representations-brain_mri.md`` and ``.json`` under ``--out``.
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

from benchmarks.clustering_eval import kmeans_reference, knn_agreement, summarise  # noqa: E402

CLASSES = ("glioma", "meningioma", "pituitary")


def representations(det: Any, rows: list[Any], workers: int = 2) -> dict[str, np.ndarray]:
    """The three representations of one-frame rows (see the module docstring)."""
    import cv2

    from training.manifest import load_sequences

    out: dict[str, list[np.ndarray]] = {"embedding": [], "backbone GAP": [], "Grad-CAM pooled": []}
    for i in range(0, len(rows), 25):
        for seq in load_sequences(rows[i:i + 25], workers=workers):
            maps = det.frame_features(det.preprocess(seq))  # (1, C, h, w)
            f = maps[0].float().numpy()
            heat = det.detect(seq, explain=True).heatmaps[0].astype(np.float32)
            w = np.maximum(cv2.resize(heat, f.shape[:0:-1], interpolation=cv2.INTER_AREA), 0.0)
            w = w / w.sum() if w.sum() > 0 else np.full_like(w, 1.0 / w.size)
            out["embedding"].append(det.embed_features(maps[:, None])[0])
            out["backbone GAP"].append(f.mean((1, 2)))
            out["Grad-CAM pooled"].append((f * w[None]).sum((1, 2)))
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def score(x: np.ndarray, truth: list[str]) -> dict[str, Any]:
    from inference.svdd import auto_support_vector_clustering

    xs = (x - x.mean(0)) / (x.std(0) + 1e-6)
    model, gamma, trace = auto_support_vector_clustering(xs, nu=0.1, k=10)
    svc = summarise(truth, model.labels)
    km = kmeans_reference(x, truth)
    return {"dims": int(x.shape[1]), "svc": {**svc, "gamma": float(gamma), "reason": trace.get("reason", "")},
            "kmeans": km, "knn10": knn_agreement(x, truth)}


def main(argv: list[str] | None = None) -> int:
    import torch

    from inference.api import load_model
    from training.manifest import read_manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("MEDGRU_DATA_ROOT", "../shared/data")))
    ap.add_argument("--model", type=Path, default=REPO / "inference" / "bundled" / "brain-mr")
    ap.add_argument("--per-class", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    t0 = time.time()
    rows = read_manifest(ns.data_root / "brain_mri" / "manifest.csv")
    rng = np.random.default_rng(0)
    pick = []
    for c in CLASSES:
        rr = [r for r in rows if r.split == "train" and r.label == c]
        pick += [rr[i] for i in sorted(rng.choice(len(rr), min(ns.per_class, len(rr)), replace=False))]
    truth = [r.label for r in pick]
    det = load_model(ns.model)
    reps = representations(det, pick)
    res = {"model": f"{det.card.name} {det.card.version}", "n": len(pick), "per_class": ns.per_class,
           "split": "train", "results": {k: score(v, truth) for k, v in reps.items()}}
    res["seconds"] = round(time.time() - t0, 1)
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "clustering-representations-brain_mri.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Tumour types as clusters: three representations of brain MRI tumour images", "",
        f"Model `{res['model']}`; {len(pick)} TRAIN-split tumour images ({ns.per_class} a class, seed 0; no test "
        f"image); {res['seconds']:.0f} s on the CPU. Generated by `benchmarks/cluster_representations.py` "
        "(see its docstring). ARI: adjusted Rand index against the class (0 = chance, 1 = the classes). "
        "The labels score; they choose nothing.", "",
        "| representation | dims | SVC (label-free width): clusters | SVC ARI | k-means (k = 3, told) ARI "
        "| 10-NN of the same class (chance) |",
        "| --- | --- | --- | --- | --- | --- |"]
    for name, r in res["results"].items():
        lines.append(f"| {name} | {r['dims']} | {r['svc']['clusters']} | {r['svc']['ari']:.3f} | "
                     f"{r['kmeans']['ari']:.3f} | {r['knn10']['agreement']:.3f} ({r['knn10']['chance']:.3f}) |")
    lines += ["", "Command:", "", "    python benchmarks/cluster_representations.py" +
              (f" --per-class {ns.per_class}" if ns.per_class != 250 else ""), ""]
    (ns.out / "clustering-representations-brain_mri.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
