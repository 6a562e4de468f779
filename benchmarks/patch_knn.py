"""Does a patch-level nearest-neighbour score (PatchCore-like) on the frozen backbone see more than style?

    MEDGRU_DATA_ROOT=<data> python benchmarks/patch_knn.py --dataset kermany_cxr [--test-split] [--threads 2]

Every normals-only model here sits at or below a lesion-blind style baseline on Kermany (``style_audit.md``):
the pooled k-NN (0.856) and MedGRU-SVC (0.835-0.862) both score whole images. A pneumonia is a local
opacity, so a score built from the most unusual *cells* of the feature map might find it where a pooled
vector does not. This script measures that on the TRAIN split first; ``--test-split`` reads the test split
only under the rule below.

Images and features (no test image read without ``--test-split``): the bundled model's own split rebuilt
from its ``training.json`` (``group_split``: fit / HPO / calibration normals by patient); the **memory** is
its fit + HPO normals, the **validation** set its calibration normals and the 500 train-split anomalies of
``style_audit.py`` / ``hpo_diagnosis.py`` (seed 0). Each image is read as the model reads it (CLAHE, 224 x
224) and mapped by the frozen EfficientNet-Lite0 to the 472-channel, stride-16 map of
``inference/backbone.py`` (block 4: channels 0-39, block 10: 40-151, block 15: 152-471).

Scores, all fitted on the memory normals only (no label is used to fit anything):

* ``pooled-knn``: the ``knn-effnet`` baseline: cell-mean vector, standardised, mean distance to the 5
  nearest memory normals;
* ``patch-<agg>-<taps>``: each cell's feature (``taps`` ``mid``: channels 0-151, PatchCore's middle
  layers; ``all``: 0-471), averaged over its 3 x 3 neighbourhood as PatchCore does, scored by the distance
  to its nearest cell in a bank of 50,000 random memory cells (seed 0); the image's score is the ``max``
  over its cells, the mean of its ``top10`` cells, or the ``mean`` of all cells;
* ``model``: the bundled MedGRU-SVC's own score, for reference.

Reported per score: the validation AUROC (calibration normals against train anomalies) and the AUROC inside
style bins of equal counts of normals (``style_audit.within_strata``, ``by="normals"``, the style logit
cross-validated on the same images exactly as ``style_audit.py`` does), which does not reward style.

The reading, fixed before the first run (2026-12-07):

* a patch score **beats** the pooled k-NN on a data set where its within-strata AUROC is at least 0.02
  above the pooled k-NN's and its plain validation AUROC is not more than 0.005 below it;
* the **chosen** score is, among the patch scores that beat the pooled k-NN on Kermany, the one with the
  highest within-strata AUROC there; where none beats it on Kermany, nothing is chosen, the test split is
  not read, and the result is recorded as negative;
* ``--test-split`` refuses to run unless a chosen score exists in the committed train-split result; it then
  reads the test split once, scoring the pooled k-NN and the chosen score with the same memory, on both
  data sets. Nothing else is tried on test.

Round 2 (added after round 1 found no patch score that beats the pooled k-NN on either data set; reading
unchanged, committed before its run): ``--region interior`` drops the outer ring of two cells of the 14 x 14
map (framing, collimation edges, text markers and padding effects live there; the lung fields and the brain
do not) from the patch scores, both from the bank and from the aggregation, and writes
``patch_knn-<dataset>-interior.*``. The pooled k-NN is unchanged (the round's reference). ``--test-split``
with ``--region interior`` takes its chosen score from the round-2 Kermany result.

Writes ``patch_knn-<dataset>.json`` / ``.md`` (``-test`` with ``--test-split``) under ``--out``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.score_reading import (StandardisedKnn, judge, run, split_rows,  # noqa: E402
                                      test_result, validation_images)

TAPS = {"mid": slice(0, 152), "all": slice(0, 472)}
AGGS = ("max", "top10", "mean")
BANK = 50_000


RING = 2  # cells dropped at each border by --region interior


def cells(maps, taps: str, region: str = "all"):
    """``(N, 1, C, h, w)`` maps -> ``(N, h'*w', c)`` float32 cells of ``taps``, 3 x 3 neighbourhood means
    (``region="interior"``: without the outer ``RING`` cells)."""
    import torch.nn.functional as F

    x = maps[:, 0, TAPS[taps]].float()
    x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if region == "interior":
        x = x[:, :, RING:-RING, RING:-RING]
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c).contiguous()


def nearest_cell_distance(query, bank, chunk: int = 4096) -> np.ndarray:
    """``(N, P, c)`` query cells -> ``(N, P)`` distance of each to its nearest bank cell (/ sqrt(c))."""
    import torch

    n, p, c = query.shape
    flat = query.reshape(-1, c)
    out = [torch.cdist(flat[i:i + chunk], bank).min(dim=1).values for i in range(0, flat.shape[0], chunk)]
    return (torch.cat(out) / math.sqrt(c)).reshape(n, p).numpy().astype(np.float64)


def pooled_features(maps) -> np.ndarray:
    """``(N, 1, C, h, w)`` (or ``(N, C, h, w)``) maps -> ``(N, C)`` cell means, float32 numpy."""
    x = maps.float()
    return (x[:, 0] if x.dim() == 5 else x).mean(dim=(2, 3)).numpy()


def aggregate(d: np.ndarray, agg: str) -> np.ndarray:
    if agg == "max":
        return d.max(axis=1)
    if agg == "top10":
        return np.sort(d, axis=1)[:, -10:].mean(axis=1)
    return d.mean(axis=1)


class Scorers:
    """Every score of the module docstring, fitted on the memory normals' maps."""

    def __init__(self, memory_maps, seed: int = 0, region: str = "all"):
        import torch

        self.region = region
        self.pooled = StandardisedKnn(pooled_features(memory_maps))
        rng = np.random.default_rng(seed)
        self.banks = {}
        for taps in TAPS:
            c = cells(memory_maps, taps, region)
            flat = c.reshape(-1, c.shape[-1])
            take = np.sort(rng.choice(flat.shape[0], size=min(BANK, flat.shape[0]), replace=False))
            self.banks[taps] = flat[torch.from_numpy(take)].contiguous()

    def all_scores(self, maps, only: set[str] | None = None) -> dict[str, np.ndarray]:
        out = {"pooled-knn": self.pooled.score(pooled_features(maps))}
        for taps in TAPS:
            suffix = "" if self.region == "all" else f"-{self.region}"
            names = [f"patch-{agg}-{taps}{suffix}" for agg in AGGS]
            if only is not None and not (set(names) & only):
                continue
            d = nearest_cell_distance(cells(maps, taps, self.region), self.banks[taps])
            for agg, name in zip(AGGS, names):
                if only is None or name in only:
                    out[name] = aggregate(d, agg)
        return out


def validation(det: Any, args: dict[str, Any], ns: Any, cache_dir: Path) -> dict[str, Any]:
    from training.train import FeatureCache

    v = validation_images(args, ns.dataset, ns.data_root)
    cache = FeatureCache(cache_dir, det)
    maps = cache.features(v.images, desc="validation")
    scores = Scorers(cache.features(v.memory, desc="memory"), region=ns.region).all_scores(maps)
    scores["model"] = np.asarray(det.boundary.score(det.embed_features(maps)), dtype=np.float64)
    table, beats = judge(scores, v.style, v.y)
    return {"n": v.n, "region": ns.region, "bank_cells": BANK, "scores": table, "beats_pooled_knn": beats}


def test_read(det: Any, args: dict[str, Any], ns: Any, cache_dir: Path, chosen: str) -> dict[str, Any]:
    from training.train import FeatureCache

    rows, fit, hpo, _, _ = split_rows(args, ns.dataset, ns.data_root)
    test_rows = [r for r in rows if r.split == "test"]
    y = np.array([0 if r.is_normal else 1 for r in test_rows])
    cache = FeatureCache(cache_dir, det)
    scorers = Scorers(cache.features(fit + hpo, desc="memory"), region=ns.region)
    scores = scorers.all_scores(cache.features(test_rows, desc="test"), only={chosen})
    return test_result(scores, y, chosen, len(fit) + len(hpo))


def main(argv: list[str] | None = None) -> int:
    def options(ap: Any) -> None:
        ap.add_argument("--region", choices=("all", "interior"), default="all",
                        help="cells the patch scores use (round 2: interior, without the outer ring)")

    return run(argv, doc=__doc__, script="patch_knn.py", title="Patch-level k-NN on the frozen backbone",
               validation=validation, test_read=test_read, options=options,
               suffix=lambda ns: "" if ns.region == "all" else f"-{ns.region}",
               flags=lambda ns: "" if ns.region == "all" else f" --region {ns.region}")


if __name__ == "__main__":
    raise SystemExit(main())
