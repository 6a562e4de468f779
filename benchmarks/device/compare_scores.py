"""Compare two ``scores.csv`` of ``medgru evaluate`` image by image (e.g. the GPU's against the CPU's).

    python benchmarks/device/compare_scores.py --reference CPU/scores.csv --candidate GPU/scores.csv \
        --label "chest-cxr 7.0.0, Kermany test" [--out result.json]

Compares the images of the candidate (all of them must be in the reference): the largest score difference,
absolute and as a share of the reference scores' spread (max - min), Spearman's rank correlation, how many
verdicts (``called_abnormal``) differ, and the AUROC of each on those images. Appends to ``--out``, a JSON
list, if given.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def read_scores(path: Path) -> dict[str, tuple[str, float, int]]:
    with Path(path).open(newline="") as f:
        return {r["name"]: (r["label"], float(r["score"]), int(r["called_abnormal"])) for r in csv.DictReader(f)}


def compare(reference: dict, candidate: dict) -> dict:
    """:func:`compare_arrays` of two ``read_scores`` results, image by image (the candidate's images)."""
    from training.metrics import binary_labels

    missing = sorted(set(candidate) - set(reference))
    if missing:
        raise ValueError(f"{len(missing)} candidate images are not in the reference, e.g. {missing[0]}")
    names = sorted(candidate)
    return compare_arrays(np.array([reference[n][1] for n in names]), np.array([candidate[n][1] for n in names]),
                          np.array([reference[n][2] for n in names]), np.array([candidate[n][2] for n in names]),
                          binary_labels(reference[n][0] for n in names))


def compare_arrays(ref: np.ndarray, cand: np.ndarray, ref_called: np.ndarray, cand_called: np.ndarray,
                   labels: np.ndarray | None = None) -> dict:
    """Two scorings of the same images: score differences (absolute and as a share of the reference's
    spread), Spearman, verdicts that differ and, where ``labels`` (1 = anomaly) hold both classes, the
    AUROC of each."""
    from scipy.stats import spearmanr

    from training.metrics import auroc

    diff = np.abs(ref - cand)
    out = {
        "n": len(ref),
        "max_abs_difference": float(diff.max()),
        "median_abs_difference": float(np.median(diff)),
        "reference_spread": float(np.ptp(ref)),
        "max_difference_over_spread": float(diff.max() / np.ptp(ref)) if np.ptp(ref) > 0 else None,
        "spearman": float(spearmanr(ref, cand)[0]),
        "verdicts_differing": int((np.asarray(ref_called) != np.asarray(cand_called)).sum()),
    }
    if labels is not None and 0 < labels.sum() < len(labels):
        out["auroc_reference"] = auroc(ref, labels)
        out["auroc_candidate"] = auroc(cand, labels)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, required=True)
    p.add_argument("--candidate", type=Path, required=True)
    p.add_argument("--label", default="")
    p.add_argument("--out", type=Path, default=None, help="JSON list to append the result to")
    args = p.parse_args(argv)
    result = {"label": args.label, "reference": args.reference.as_posix(), "candidate": args.candidate.as_posix(),
              **compare(read_scores(args.reference), read_scores(args.candidate))}
    print(json.dumps(result, indent=2))
    if args.out:
        rows = json.loads(args.out.read_text()) if args.out.is_file() else []
        rows = [r for r in rows if r.get("label") != args.label] + [result]
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
