"""``medgru calibrate``: re-set a model's decision threshold on a site's own normal images.

::

    medgru calibrate --model models/chest-cxr --folder site-normals --out models/chest-cxr-site
    medgru calibrate --model models/chest-cxr --manifest site.csv --split test --out models/chest-cxr-site

A model's threshold is split-conformal on held-out normals of its training data; it need not hold on
another site's images (scanner, population, projection). This command scores the site's normals with the
model as it is and sets the threshold to their split-conformal quantile at ``--target-fpr``: the
``ceil((n + 1)(1 - a))``-th smallest score (:func:`inference.api.conformal_threshold`), so that a new normal
from the same site exceeds it with probability at most ``a``. Nothing is retrained.

* Rows: the normal rows (:attr:`training.manifest.ManifestRow.is_normal`) of a manifest or of a folder
  (``<label>/*`` or ``<split>/<label>/*``); with ``--split``, only those of that split (when the rows
  have splits). Anomalies are never used. Each frame of a multi-frame file is scored alone, as the
  service scores each frame of a series.
* The scores are kept beside the threshold (``calibration.json``): a series of T frames is compared with
  their quantile at ``a / T`` (:meth:`inference.api.Detector.series_threshold`). n scores cover a series
  of up to ``a (n + 1)`` frames; the command prints that length and warns where it is shorter than the
  source model's. The frames of one multi-frame file count one by one, but they resemble each other more
  than a new patient's frames resemble them: normals from many patients make the guarantee.
* Too few normals for the conformal rank to be a real score (``n < ceil(1 / a) - 1``: 19 at 5 %) is an
  error (exit 2): the threshold would be the largest score, without the guarantee.
* The source folder is never written. The new folder holds the source's files, the detector's files
  re-saved with the new threshold and scores (``Detector.calibrate`` + ``save_model``), and a card with a new version
  (default ``<old version>+cal.<UTC yyyymmddHHMM>``), fresh checksums and a ``calibration`` record.
  It is built beside ``--out`` under a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from training.model_folder import staged_model_folder

log = logging.getLogger(__name__)

CAL_TAG = "cal"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder to recalibrate (not modified)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help="CSV with path,label[,split,group]; paths relative to it")
    src.add_argument("--folder", type=Path, help="folder of <label>/*.png|jpg|jpeg|dcm or <split>/<label>/*")
    parser.add_argument("--out", type=Path, required=True, help="new model folder to write (must not exist)")
    parser.add_argument("--target-fpr", type=float, default=0.05,
                        help="false-positive rate the threshold is set for (default 0.05)")
    parser.add_argument("--split", default="",
                        help="use only the normals of this split (ignored when the rows have no split)")
    parser.add_argument("--version", default="",
                        help="version of the new model (default: <old version>+cal.<UTC yyyymmddHHMM>)")
    parser.add_argument("--batch", type=int, default=64, help="images per score_batch call")
    parser.add_argument("--workers", type=int, default=2, help="image-decoding threads")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    parser.add_argument("--device", default=None,
                        help="torch device to score on: cpu, cuda or auto (cuda where torch sees a GPU); default: "
                             "the settings' device (MEDGRU_DEVICE, auto). The model is saved for the CPU either way")


# ------------------------------------------------------------------------------------------- helpers
def calibrated_version(old: str, now: datetime) -> str:
    """``<old>+cal.<yyyymmddHHMM>``; an earlier ``+cal.`` tag is replaced, other build metadata kept
    (``1.0+cal.202401010000`` -> ``1.0+cal.<now>``, ``1.0+abc`` -> ``1.0+abc.cal.<now>``)."""
    stamp = f"{CAL_TAG}.{now.astimezone(timezone.utc).strftime('%Y%m%d%H%M')}"
    base, plus, meta = old.partition("+")
    meta = re.sub(rf"(^|\.){CAL_TAG}\.\d{{12}}$", "", meta) if plus else ""
    return f"{base}+{meta}.{stamp}" if meta else f"{base}+{stamp}"


def select_normals(rows: list, split: str) -> list:
    """The normal rows, of ``split`` when one is given and the rows have splits."""
    from training.manifest import rows_of_split

    return [r for r in (rows_of_split(rows, split) if split else rows) if r.is_normal]


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _copy_contents(src: Path, dst: Path) -> None:
    """Copy the files under ``src`` into the existing folder ``dst``: contents only, so a read-only
    source (an installed package) still gives a folder the detector can ``save`` into."""
    for entry in sorted(src.iterdir()):
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name, copy_function=shutil.copyfile)
        elif entry.is_file():
            shutil.copyfile(entry, dst / entry.name)


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace, settings) -> int:
    from inference.api import conformal_min_normals, conformal_rank, load_model, save_model, sha256_file
    from training.evaluate import score_all
    from training.manifest import expand_frames, load_sequences, read_manifest, rows_from_folder

    alpha = float(args.target_fpr)
    if not 0.0 < alpha < 1.0:
        return _error(f"--target-fpr must lie in (0, 1), got {args.target_fpr}")
    model_dir = Path(args.model)
    out = Path(args.out)
    if not (model_dir / "card.json").is_file():
        return _error(f"{model_dir} is not a model folder (no card.json)")
    if out.exists():
        return _error(f"{out} exists; calibrate writes a new model folder and never overwrites one")
    if _is_within(out.resolve(), model_dir.resolve()):
        return _error("--out must not lie inside the source model folder")

    source = Path(args.manifest if args.manifest is not None else args.folder)
    source_name = source.resolve().name  # recorded and printed: never a machine path
    try:
        rows = read_manifest(source) if args.manifest is not None else rows_from_folder(source)
    except (OSError, ValueError) as exc:
        return _error(f"cannot read {source_name}: {exc}")
    normals = select_normals(rows, args.split)
    split = args.split if args.split and any(r.split for r in rows) else None  # the split actually applied
    need = conformal_min_normals(alpha)
    where = source_name + (f" (split {split!r})" if split else "")
    # each frame of a multi-frame file alone, as the threshold is used: a series' frames are each scored
    # alone and its highest is compared with the scores' quantile at target FPR / T (series_threshold)
    images = expand_frames(normals)
    if len(images) < need:
        return _error(f"{len(images)} normal images in {where}; a split-conformal threshold at a "
                      f"false-positive rate of {alpha:g} needs at least {need} normals")

    from inference.device import resolve_device

    try:
        device = resolve_device(args.device or settings.device)
    except ValueError as exc:
        return _error(str(exc))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        det = load_model(model_dir, verify=True)
    except (OSError, ValueError, LookupError) as exc:  # a checksum that differs, a missing file
        return _error(f"model folder {model_dir}: {exc}")
    card = det.card
    assert card is not None  # load_model sets it
    old_threshold = float(det.threshold)
    old_covered = longest_covered_series(det.calibration_scores, det.calibration_alpha)
    home_device = getattr(det, "device", None)
    if hasattr(det, "to") and device != "cpu":
        det.to(device)
    log.info("calibrate: model %s %s (%s) on %d normals of %s", card.name, card.version, card.detector,
             len(normals), where)
    scores, _ = score_all(det, load_sequences(images, workers=args.workers), args.batch)
    if not np.isfinite(scores).all():
        return _error(f"the model gave {int((~np.isfinite(scores)).sum())} non-finite scores on {where}")
    if hasattr(det, "to") and home_device is not None:
        det.to(home_device)  # the saved files must not depend on the device used for scoring
    new_threshold = det.calibrate(scores, alpha)  # the threshold, and the scores kept beside it

    now = datetime.now(timezone.utc)
    record: dict[str, Any] = {
        "method": "split-conformal: the ceil((n + 1)(1 - target_fpr))-th smallest score of the normals",
        "n_normals": len(normals),
        "n_images": len(images),  # frames of multi-frame files counted one by one
        "longest_series_covered": longest_covered_series(scores, alpha),
        "source_longest_series_covered": old_covered,
        "conformal_rank": conformal_rank(len(images), alpha),
        "target_fpr": alpha,
        "old_threshold": old_threshold,
        "new_threshold": new_threshold,
        "old_threshold_fpr_on_these_normals": float((scores > old_threshold).mean()),
        "new_threshold_fpr_on_these_normals": float((scores > new_threshold).mean()),  # in-sample
        "source": source_name,
        "split": split,
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "calibrated_from_version": card.version,
    }
    if card.calibration:
        record["previous"] = dict(card.calibration)
    version = args.version or calibrated_version(card.version, now)

    with staged_model_folder(out, replace=False) as tmp:  # a new folder, never an existing one
        _copy_contents(model_dir, tmp)  # the files save() does not write (e.g. training.json) come along
        written = save_model(det, tmp)
        names = list(dict.fromkeys([*card.files, *written]))
        new_card = replace(card, version=version, files={n: sha256_file(tmp / n) for n in names},
                           calibration=record)
        new_card.write(tmp)
        check = load_model(tmp, verify=True)  # what a worker will load: checksums and the threshold
        if check.threshold != new_threshold:
            raise RuntimeError(f"the saved threshold {check.threshold} is not the new one {new_threshold}")

    log.info("wrote %s (%s %s)", out.name, card.name, version)
    print(f"{card.name}: {len(normals)} normals of {where}; old threshold {old_threshold:.6g} "
          f"(FPR {record['old_threshold_fpr_on_these_normals']:.3f} on these normals) -> "
          f"new threshold {new_threshold:.6g} at target FPR {alpha:g}")
    covered = record["longest_series_covered"]
    print(f"{len(images)} scores cover a series of up to {covered} frame{'s' if covered != 1 else ''} at "
          f"{alpha:g} (a longer one is bounded by T / {len(images) + 1})")
    if old_covered is not None and covered < old_covered:
        print(f"warning: the source model's calibration covered series of up to {old_covered} frames; "
              f"{conformal_min_normals(alpha / old_covered)} normal images would cover as many", file=sys.stderr)
    print(f"new model {version}: {out}")
    return 0


def longest_covered_series(scores, alpha: float | None) -> int | None:
    """:func:`inference.api.conformal_longest_series` of the scores, or ``None`` without scores."""
    from inference.api import conformal_longest_series

    return None if scores is None or alpha is None else conformal_longest_series(len(scores), alpha)
