"""Does a left-right asymmetry score on the frozen backbone see more than style?

    MEDGRU_DATA_ROOT=<data> python benchmarks/symmetry_knn.py --dataset kermany_cxr [--test-split] [--threads 2]

On Kermany every normals-only score here (MedGRU-SVC, the pooled k-NN, the patch scores of
``patch_knn.py``) compares an image with *other people's* normal images, and the test normals differ from
the training normals in how they were made (``style_audit.md``, ``domain_shift.md``). An image compared
with *itself* does not see that: a chest (or a head) is roughly mirror-symmetric, a lobar pneumonia (or a
tumour) usually is not, and exposure, contrast, sharpness and JPEG history act on both halves alike. The
score here is how differently the two halves of the image look to the frozen backbone, against how
differently they look in normal images (a normal heart, for one, is not symmetric).

Images and split: those of ``patch_knn.py`` (the bundled model's own split from its ``training.json``;
memory = its fit + HPO normals; validation = its calibration normals and 500 train anomalies, seed 0; no
test image is read without ``--test-split``). Each image is preprocessed as the model does (CLAHE, 224 x
224), and mapped by the frozen EfficientNet-Lite0 to the 472-channel stride-16 map ``F`` twice: as it is and
mirrored left-right. ``A = F(x) - F(mirror(x))`` is zero for a perfectly symmetric image; at cell ``p`` it
compares what the backbone sees at ``p`` with what it sees at the mirrored place, mirrored. ``A`` of the
mirrored image is ``-A`` mirrored, so only the left half of the columns is used, and only the interior
(without the outer ring of two cells, as ``patch_knn.py --region interior``): a 10 x 5 grid.

Scores, fitted on the memory normals only (no label fits anything):

* ``asym-knn``: the cell-mean of ``|A|`` (472 values), standardised with the memory's mean and sd, mean
  distance to the 5 nearest memory normals (as ``knn-effnet`` does with the plain features);
* ``asym-cell-mean`` / ``asym-cell-max``: ``A`` standardised per channel and cell with the memory's mean
  and sd; a cell's score is the mean over channels of the squared z; the image's score is the mean / the
  maximum over the 50 cells;
* ``pooled-knn + asym-knn``: the sum of the two scores, each first standardised by the mean and sd of the
  memory normals' own leave-one-out scores;
* ``pooled-knn``: the reference, as in ``patch_knn.py``.

Reported per score: validation AUROC, and the AUROC within style bins of equal counts of normals, as in
``patch_knn.py``.

The reading (the one of ``patch_knn.py``), fixed before the first run (2026-12-07):

* a score **beats** the pooled k-NN on a data set where its within-strata AUROC is at least 0.02 above the
  pooled k-NN's and its plain validation AUROC is not more than 0.005 below it;
* the **chosen** score is, among the scores that beat the pooled k-NN on Kermany, the one with the highest
  within-strata AUROC there; where none does, the test split is not read;
* ``--test-split`` refuses to run unless a chosen score exists in the committed Kermany result; it reads the
  test split once, scoring the pooled k-NN and the chosen score with the same memory, on the data set asked.
  Nothing else is tried on test.

Writes ``symmetry_knn-<dataset>.json`` / ``.md`` (``-test`` with ``--test-split``) under ``--out``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.patch_knn import RING, pooled_features  # noqa: E402
from benchmarks.score_reading import (StandardisedKnn, floored, judge, run, split_rows,  # noqa: E402
                                      test_result, validation_images)


def mirrored_maps(rows: list, det: Any, cache_dir: Path, desc: str):
    """``(N, C, h, w)`` float16 maps of the rows' preprocessed frames mirrored left-right
    (``recipe_selection.mirrored_maps`` with the model's own preprocessing), cached in ``cache_dir``."""
    import hashlib

    import torch

    from benchmarks.recipe_selection import mirrored_maps as compute

    key = hashlib.sha256(json.dumps([str(r.path) for r in rows] + [det.input_size, det.clip_limit,
                                                                    det.tile_grid]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"mirrored-{desc}-{key}.npy"
    if not path.is_file():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        np.save(path, compute(rows, det=det)[:, 0].numpy())
    return torch.from_numpy(np.load(path))


def asymmetry(maps, mirrored) -> np.ndarray:
    """``A`` on the interior left half: ``(N, C, h - 2 RING, w // 2 - RING)`` float32 numpy."""
    a = maps.float() - mirrored.float()
    h, w = a.shape[-2:]
    return a[:, :, RING:h - RING, RING:w // 2].numpy().astype(np.float32)


class SymmetryScorers:
    def __init__(self, mem_maps, mem_mirrored):
        self.pooled = StandardisedKnn(pooled_features(mem_maps))
        a = asymmetry(mem_maps, mem_mirrored)
        self.asym = StandardisedKnn(np.abs(a).mean(axis=(2, 3)))
        self.c_mu = a.mean(axis=0)
        self.c_sd = floored(a.std(axis=0))
        # the memory's own leave-one-out scores, to put the two k-NN scores on one scale
        p_loo, g_loo = self.pooled.memory_scores(), self.asym.memory_scores()
        self.loo = {"pooled-knn": (p_loo.mean(), p_loo.std()), "asym-knn": (g_loo.mean(), g_loo.std())}

    def scores(self, maps, mirrored) -> dict[str, np.ndarray]:
        out = {"pooled-knn": self.pooled.score(pooled_features(maps))}
        a = asymmetry(maps, mirrored)
        out["asym-knn"] = self.asym.score(np.abs(a).mean(axis=(2, 3)))
        cell = (((a - self.c_mu) / self.c_sd) ** 2).mean(axis=1).reshape(len(a), -1).astype(np.float64)
        out["asym-cell-mean"] = cell.mean(axis=1)
        out["asym-cell-max"] = cell.max(axis=1)
        z = {n: (out[n] - m) / s for n, (m, s) in self.loo.items()}
        out["pooled-knn + asym-knn"] = z["pooled-knn"] + z["asym-knn"]
        return out


def validation(det: Any, args: dict[str, Any], ns: Any, cache_dir: Path) -> dict[str, Any]:
    from training.train import FeatureCache

    v = validation_images(args, ns.dataset, ns.data_root)
    cache = FeatureCache(cache_dir, det)
    sc = SymmetryScorers(cache.features(v.memory, desc="memory")[:, 0],
                         mirrored_maps(v.memory, det, cache_dir, "memory"))
    scores = sc.scores(cache.features(v.images, desc="validation")[:, 0],
                       mirrored_maps(v.images, det, cache_dir, "validation"))
    table, beats = judge(scores, v.style, v.y)
    return {"n": v.n, "scores": table, "beats_pooled_knn": beats}


def test_read(det: Any, args: dict[str, Any], ns: Any, cache_dir: Path, chosen: str) -> dict[str, Any]:
    from training.train import FeatureCache

    rows, fit, hpo, _, _ = split_rows(args, ns.dataset, ns.data_root)
    memory = fit + hpo
    test_rows = [r for r in rows if r.split == "test"]
    y = np.array([0 if r.is_normal else 1 for r in test_rows])
    cache = FeatureCache(cache_dir, det)
    sc = SymmetryScorers(cache.features(memory, desc="memory")[:, 0], mirrored_maps(memory, det, cache_dir, "memory"))
    scores = sc.scores(cache.features(test_rows, desc="test")[:, 0], mirrored_maps(test_rows, det, cache_dir, "test"))
    return test_result(scores, y, chosen, len(memory))


def main(argv: list[str] | None = None) -> int:
    return run(argv, doc=__doc__, script="symmetry_knn.py", title="Left-right asymmetry on the frozen backbone",
               validation=validation, test_read=test_read)


if __name__ == "__main__":
    raise SystemExit(main())
