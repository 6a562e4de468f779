"""What the label-free score audits (``patch_knn.py``, ``symmetry_knn.py``) share: the images, the reading,
the report and the command line.

Images (no test image): a bundled model's own split rebuilt from its ``training.json`` (``group_split``:
fit / HPO / calibration normals by patient), and 500 random train-split anomalies (seed 0), the set of
``style_audit.py`` and ``hpo_diagnosis.py``. The memory of a label-free score is the fit + HPO normals,
its validation set the calibration normals and those anomalies. The style logit is the one of
``style_audit.py``: a logistic regression on the eight lesion-blind statistics of ``training/style.py``,
out-of-fold over the validation images.

The reading, common to the audits and fixed before their first runs (2026-12-07):

* a score **beats** the pooled k-NN (``REFERENCE``) on a data set where its AUROC within style bins of
  equal counts of normals (``style_audit.within_strata``) is at least ``MARGIN`` above the pooled k-NN's and
  its plain validation AUROC is not more than ``SLACK`` below it;
* the **chosen** score is, among the scores that beat it on Kermany, the one with the highest within-strata
  AUROC there; where none does, the test split is not read;
* ``--test-split`` refuses to run unless the committed Kermany result names a chosen score; it then reads
  the test split once, scoring the pooled k-NN and the chosen score with the same memory.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.hpo_diagnosis import load_with_training_args, model_parser, write_results
from benchmarks.recipe_selection import auroc
from benchmarks.style_audit import within_strata

REFERENCE = "pooled-knn"
MARGIN = 0.02
SLACK = 0.005
N_ANOMALIES = 500
#: neighbours of the k-NN scores (as the knn-effnet baseline)
K_POOLED = 5


def floored(sd: np.ndarray) -> np.ndarray:
    """A standard deviation with knn-effnet's floor, so that no feature is divided by (nearly) zero."""
    return sd + 1e-3 * sd.mean() + 1e-6


class StandardisedKnn:
    """The ``knn-effnet`` score on given vectors: each feature standardised with the memory's mean and
    (floored) sd, then the mean Euclidean distance to the ``k`` nearest memory vectors over sqrt(dim)."""

    def __init__(self, memory: np.ndarray, k: int = K_POOLED):
        memory = np.asarray(memory, dtype=np.float32)
        self.k = k
        self.mu = memory.mean(axis=0)
        self.sd = floored(memory.std(axis=0))
        self.bank = self._z(memory)

    def _z(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float32) - self.mu) / self.sd).astype(np.float32)

    def _distance(self, z: np.ndarray, exclude_self: bool) -> np.ndarray:
        import torch

        d = torch.cdist(torch.from_numpy(z), torch.from_numpy(self.bank))
        if exclude_self:
            d.fill_diagonal_(float("inf"))
        k = min(self.k, d.shape[1] - int(exclude_self))
        near = torch.topk(d, k, dim=1, largest=False).values.mean(dim=1)
        return (near / math.sqrt(z.shape[1])).numpy().astype(np.float64)

    def score(self, x: np.ndarray) -> np.ndarray:
        return self._distance(self._z(x), exclude_self=False)

    def memory_scores(self) -> np.ndarray:
        """Each memory vector's score against the others (leave-one-out)."""
        return self._distance(self.bank, exclude_self=True)


def split_rows(args: dict[str, Any], dataset: str, data_root: Path):
    """The manifest's rows, the model's fit / HPO / calibration normals and the 500 train anomalies."""
    from training.manifest import read_manifest
    from training.train import group_split

    rows = read_manifest(data_root / dataset / "manifest.csv")
    normals = [r for r in rows if r.split == "train" and r.is_normal]
    fit, hpo, cal = group_split(normals, [float(args["hpo_fraction"]), float(args["calibration_fraction"])],
                                int(args["seed"]))
    anomalies = [r for r in rows if r.split == "train" and not r.is_normal]
    pick = np.random.default_rng(0).choice(len(anomalies), N_ANOMALIES, replace=False)
    return rows, fit, hpo, cal, [anomalies[i] for i in sorted(pick)]


@dataclass
class ValidationImages:
    memory: list
    images: list
    y: np.ndarray
    style: np.ndarray
    n: dict[str, int]


def validation_images(args: dict[str, Any], dataset: str, data_root: Path) -> ValidationImages:
    """Memory, validation images with their labels and the out-of-fold style logit of each."""
    from training.manifest import load_sequences
    from training.style import cross_validated_style, statistics_matrix, thumbnail_template

    _, fit, hpo, cal, anomalies = split_rows(args, dataset, data_root)
    images = cal + anomalies
    y = np.array([0] * len(cal) + [1] * len(anomalies))
    template = thumbnail_template([s.frames[-1] for s in load_sequences(fit)])
    style = cross_validated_style(statistics_matrix([s.frames[-1] for s in load_sequences(images)], template), y)
    return ValidationImages(fit + hpo, images, y, style, {
        "memory_normals": len(fit) + len(hpo), "validation_normals": len(cal), "train_anomalies": len(anomalies)})


def judge(scores: dict[str, np.ndarray], style: np.ndarray, y: np.ndarray) -> tuple[dict[str, Any], list[str]]:
    """Each score's validation and within-strata AUROC, and the scores that beat ``REFERENCE``."""
    table = {}
    for name, s in scores.items():
        ws = within_strata(s, style, y, by="normals")
        table[name] = {"auroc": auroc(s[y == 0], s[y == 1]), "within_strata": ws["weighted_auroc"],
                       "pairs_used": ws["pairs_used"], "pairs_all": ws["pairs_all"]}
    ref = table[REFERENCE]
    beats = [n for n, r in table.items() if n != REFERENCE and n != "model"
             and r["within_strata"] is not None and ref["within_strata"] is not None
             and r["within_strata"] >= ref["within_strata"] + MARGIN and r["auroc"] >= ref["auroc"] - SLACK]
    return table, beats


def chosen_score(path: Path) -> str | None:
    """The chosen score of a committed Kermany result (None where no score beat the reference)."""
    if not path.is_file():
        raise SystemExit(f"{path} missing: run the train-split audit on kermany_cxr first")
    res = json.loads(path.read_text())
    if not res["beats_pooled_knn"]:
        return None
    return max(res["beats_pooled_knn"], key=lambda n: res["scores"][n]["within_strata"])


def test_result(scores: dict[str, np.ndarray], y: np.ndarray, chosen: str, memory: int) -> dict[str, Any]:
    return {"chosen": chosen,
            "n": {"memory_normals": memory, "test_normals": int((y == 0).sum()), "test_anomalies": int((y == 1).sum())},
            "test_auroc": {n: auroc(scores[n][y == 0], scores[n][y == 1]) for n in (REFERENCE, chosen)}}


def markdown_writer(title: str, script: str) -> Callable[[dict[str, Any], Path], str]:
    def write_md(res: dict[str, Any], path: Path) -> str:
        lines = [f"# {title}: {res['dataset']}", "",
                 f"Command: `{res['command']}` ({res['seconds']:.0f} s). Protocol and reading: the docstrings of "
                 f"`benchmarks/{script}` and `benchmarks/score_reading.py`.", ""]
        n = res["n"]
        if "test_auroc" in res:
            lines += [f"Test split, read once for the chosen score `{res['chosen']}` (memory: "
                      f"{n['memory_normals']} train normals; {n['test_normals']} test normals, "
                      f"{n['test_anomalies']} test anomalies):", "", "| score | test AUROC |", "| --- | --- |"]
            lines += [f"| {k} | {a:.3f} |" for k, a in res["test_auroc"].items()]
        else:
            lines += [f"Validation: {n['validation_normals']} held-out train normals against "
                      f"{n['train_anomalies']} train anomalies; memory {n['memory_normals']} train normals "
                      f"({res['model']}'s split).", "",
                      "| score | validation AUROC | within style strata | pairs used |", "| --- | --- | --- | --- |"]
            for name, r in res["scores"].items():
                ws = "n/a" if r["within_strata"] is None else f"{r['within_strata']:.3f}"
                lines.append(f"| {name} | {r['auroc']:.3f} | {ws} | "
                             f"{r['pairs_used'] / max(r['pairs_all'], 1):.1%} |")
            lines += ["", "Scores that beat the pooled k-NN by the reading: "
                      + (", ".join(f"`{b}`" for b in res["beats_pooled_knn"]) or "none") + "."]
        text = "\n".join(lines) + "\n"
        path.write_text(text)
        return text

    return write_md


def run(argv: list[str] | None, *, doc: str, script: str, title: str,
        validation: Callable[..., dict[str, Any]], test_read: Callable[..., dict[str, Any]],
        options: Callable[[Any], None] = lambda ap: None,
        suffix: Callable[[Any], str] = lambda ns: "", flags: Callable[[Any], str] = lambda ns: "") -> int:
    """The command line of an audit: ``validation(det, args, ns, cache)`` without ``--test-split``,
    ``test_read(det, args, ns, cache, chosen)`` with it; results under ``--out`` as
    ``<script stem>-<dataset><suffix(ns)>[-test]``; ``options`` adds the script's own options and ``flags``
    writes them back for the recorded command."""
    ap = model_parser(doc.splitlines()[0], "(not used here; see --test-split)")
    ap.add_argument("--test-split", action="store_true",
                    help="read the test split once for the chosen score (refused where none was chosen)")
    options(ap)
    ns = ap.parse_args(argv)
    if ns.test_sensitivity:
        raise SystemExit("use --test-split")
    t0 = time.time()
    base = Path(script).stem
    chosen = None
    if ns.test_split:
        chosen = chosen_score(ns.out / f"{base}-kermany_cxr{suffix(ns)}.json")
        if chosen is None:
            raise SystemExit("no score beat the pooled k-NN on Kermany validation: the test split is not read")
    det, args = load_with_training_args(ns)
    with tempfile.TemporaryDirectory(prefix=f"{base}-") as tmp:
        cache = ns.cache or Path(tmp)
        res = validation(det, args, ns, cache) if chosen is None else test_read(det, args, ns, cache, chosen)
    res = {"dataset": ns.dataset, "model": f"{det.card.name} {det.card.version}", **res}
    res["command"] = f"python benchmarks/{script} --dataset {ns.dataset}{flags(ns)}" + (
        " --test-split" if ns.test_split else "")
    res["seconds"] = time.time() - t0
    write_results(res, ns.out / (f"{base}-{ns.dataset}{suffix(ns)}" + ("-test" if ns.test_split else "")),
                  markdown_writer(title, script))
    return 0
