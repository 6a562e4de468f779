"""Recover the calibration scores behind a shipped model's threshold and keep them in its folder.

A model's threshold is the split-conformal quantile of its held-out calibration normals. The service
needs those scores, not only the quantile, to give a series of T frames a threshold with the same target
false-positive rate (:meth:`inference.api.Detector.series_threshold`). Models trained before 2026-12-07
kept only the threshold. This script rebuilds the calibration rows exactly as training chose them (same
manifest, split, seed and fractions, read from the folder's ``training.json`` or card), scores them with
the model as shipped, and accepts them only if their number is the one training recorded and their
conformal quantile reproduces the shipped threshold: the same order statistic, i.e. the difference is under
1 % of the gap to either neighbouring score (and under 1e-3 relative). Scores computed on another processor
differ in the last digits (the chest model: 1.1e-4 relative, against neighbours 4 % and 28 % away). It
then writes ``calibration.json`` and lists it with its checksum in ``card.json``; the shipped threshold,
the weights and the version do not change.

::

    python benchmarks/calibration_scores.py --model inference/bundled/chest-cxr \\
        --manifest "$MEDGRU_DATA_ROOT/kermany_cxr/manifest.csv" [--write]

Without ``--write`` it only checks and prints. Results: ``benchmarks/results/calibration_scores.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOLERANCE = 1e-3  # relative, as inference.api.Detector.load_calibration allows
NEIGHBOUR_SHARE = 0.01


def medgru_calibration_rows(folder: Path, manifest: Path) -> tuple[list, int]:
    """The calibration rows ``medgru train`` held out (``training.prepare``), and how many it recorded."""
    from training.manifest import expand_frames, read_manifest, rows_of_split
    from training.train import group_split

    info = json.loads((folder / "training.json").read_text())
    a = info["command_args"]
    if a.get("manifest") != manifest.name:
        raise SystemExit(f"{folder.name} was trained on {a.get('manifest')!r}, not {manifest.name!r}")
    normals = [r for r in expand_frames(rows_of_split(read_manifest(manifest), a["train_split"])) if r.is_normal]
    if a.get("max_normals") and len(normals) > a["max_normals"]:
        rng = np.random.default_rng(a["seed"])
        normals = [normals[i] for i in sorted(rng.choice(len(normals), a["max_normals"], replace=False))]
    _, _, cal = group_split(normals, [a["hpo_fraction"], a["calibration_fraction"]], a["seed"])
    return cal, int(info["fit_report"]["calibration_normals"])


def knn_calibration_rows(card, manifest: Path) -> tuple[list, int]:
    """The rows ``train_knn`` held out (``training.baseline.grouped_holdout``) from the train split's normals,
    seed and fraction as its card records them (``training_data``: "..., N grouped held-out ...")."""
    import re

    from training.baseline import grouped_holdout
    from training.manifest import read_manifest, rows_of_split

    m = re.search(r"(\d+) grouped held-out training-split normals for calibration, from (\S+) \(seed (\d+)\)",
                  card.training_data)
    if m is None:
        raise SystemExit(f"{card.name}: the card's training_data does not say how it was calibrated")
    n, name, seed = int(m.group(1)), m.group(2), int(m.group(3))
    if name != manifest.name:
        raise SystemExit(f"{card.name} was trained on {name!r}, not {manifest.name!r}")
    normals = [r for r in rows_of_split(read_manifest(manifest), "train") if r.is_normal]
    _, cal = grouped_holdout(normals, float(card.params["holdout_fraction"]), seed)
    return [normals[i] for i in cal], n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--write", action="store_true", help="write calibration.json and update the card")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="append the figures as JSON to this file")
    args = parser.parse_args(argv)

    import torch

    from inference.api import (CALIBRATION_FILENAME, ModelCard, conformal_exceedance_bound, conformal_longest_series,
                               conformal_rank, conformal_threshold, load_model, sha256_file)
    from training.evaluate import score_all
    from training.manifest import load_sequences

    torch.set_num_threads(args.threads)
    folder = args.model
    det = load_model(folder, verify=True)
    card = det.card
    rows, recorded = (medgru_calibration_rows(folder, args.manifest) if card.detector == "medgru-svc"
                      else knn_calibration_rows(card, args.manifest))
    if len(rows) != recorded:
        raise SystemExit(f"{card.name}: rebuilt {len(rows)} calibration rows, training recorded {recorded}")
    alpha = float(getattr(det, "target_fpr", None) or card.params.get("target_fpr") or card.params.get("alpha"))
    t0 = time.perf_counter()
    scores, _ = score_all(det, load_sequences(rows, workers=2), 16)
    seconds = time.perf_counter() - t0
    quantile = conformal_threshold(scores, alpha)
    rel = abs(quantile - det.threshold) / max(abs(det.threshold), 1e-300)
    n = len(scores)
    ordered = np.sort(scores)
    k = min(conformal_rank(n, alpha), n) - 1
    gaps = [ordered[k] - ordered[k - 1]] if k > 0 else []
    gaps += [ordered[k + 1] - ordered[k]] if k + 1 < n else []
    same_statistic = all(abs(quantile - det.threshold) < NEIGHBOUR_SHARE * g for g in gaps)
    figures = {
        "model": f"{card.name} {card.version}", "folder": folder.name, "calibration_normals": n,
        "target_fpr": alpha, "shipped_threshold": det.threshold, "rebuilt_quantile": quantile,
        "relative_difference": rel, "gaps_to_neighbours": [float(g) for g in gaps],
        "accepted": bool(rel <= TOLERANCE and same_statistic), "seconds": round(seconds, 1),
        "largest_series_with_the_guarantee": conformal_longest_series(n, alpha),
        "fpr_bound_at": {str(t): min(1.0, t * conformal_exceedance_bound(n, alpha / t)) for t in (1, 2, 8, 16, 24)},
        "series_threshold_at": {str(t): conformal_threshold(scores, alpha / t) for t in (1, 2, 8, 16, 24)},
    }
    print(json.dumps(figures, indent=1))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(figures) + "\n")
    if not figures["accepted"]:
        print(f"{card.name}: the rebuilt scores do not reproduce the threshold; nothing written", file=sys.stderr)
        return 1
    if args.write:
        det.attach_calibration(scores, alpha)  # beside the shipped threshold, which stays
        det.save_calibration(folder)
        raw = json.loads((folder / "card.json").read_text())
        raw["files"][CALIBRATION_FILENAME] = sha256_file(folder / CALIBRATION_FILENAME)
        (folder / "card.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        check = load_model(folder, verify=True)
        assert check.calibration_scores is not None and ModelCard.read(folder).version == card.version
        print(f"wrote {folder.name}/{CALIBRATION_FILENAME} ({n} scores) and its checksum in card.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
