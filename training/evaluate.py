"""``medgru evaluate``: score a manifest's test split with a model folder and write a report.

::

    medgru evaluate --manifest kermany_cxr/manifest.csv --out reports/kermany [--model DIR] [--cv 5] [--limit N]
    medgru evaluate --folder some/images --out reports/x

* Rows: the ``test`` split of the manifest, or every row when it has no split column. ``--folder`` reads
  ``<folder>/<label>/*`` or ``<folder>/<split>/<label>/*``. A relative ``--manifest``/``--folder`` that
  does not exist is looked up under ``settings.data_root``.
* Labels: ``normal``, ``0``, ``notumor``, ``no_tumor`` or ``healthy`` (:func:`training.metrics.is_normal_label`,
  the rule train and calibrate use too) is normal; any other label is an anomaly class, reported per class.
* Scores come from ``Detector.score_batch``; ``detect(explain=True)`` runs only for the heat-map gallery
  (the top true positives, false positives and false negatives at the model's threshold).
* ``--cv K``: K folds over the TRAIN normals (grouped by ``group`` where the manifest has one). For each
  fold an untrained twin of the model (``get_detector_class(card.detector)(**card.params)``) is fitted on
  the other folds' normals and calibrated on the fold's own normals; the report gives every fold and the
  mean ± std. Anomalies never take part in fitting or calibration. What a twin is scored on
  (``--cv-on``):

  - ``validation`` (the default): the fold's own normals against a fixed, seeded sample of TRAIN-split
    anomalies (``--cv-anomalies``). It reads no test image, so it may choose between recipes. Only
    threshold-free metrics are reported: the fold's normals also set the threshold.
  - ``test``: the evaluation rows (the test split). A figure to report, never to choose by: a recipe kept
    because its test CV passed a gate has been selected on the test split (as the brain model 9.0.0 was,
    ``benchmarks/results/cv-validation-brain_mri.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "chest-cxr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help="CSV with path,label[,split,group]; paths relative to it")
    src.add_argument("--folder", type=Path, help="folder of <label>/*.png|jpg|jpeg|dcm or <split>/<label>/*")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"model folder (default: the bundled {DEFAULT_MODEL_NAME} model)")
    parser.add_argument("--out", type=Path, required=True, help="report folder (created)")
    parser.add_argument("--cv", type=int, default=0, metavar="K",
                        help="also run K-fold cross-validation over the train normals (K >= 2)")
    parser.add_argument("--cv-on", choices=("validation", "test"), default="validation",
                        help="what the CV twins are scored on: each fold's own normals against train-split "
                             "anomalies (validation, the default: reads no test image), or the test split "
                             "(a figure to report, never to choose a recipe by)")
    parser.add_argument("--cv-anomalies", type=int, default=500, metavar="N",
                        help="with --cv-on validation: a seeded sample of N train-split anomalies (0 = all)")
    parser.add_argument("--limit", type=int, default=0, metavar="N",
                        help="quick look: a class-stratified random subset of N test rows (and, with --cv, "
                             "at most N train normals)")
    parser.add_argument("--gallery", type=int, default=4, metavar="N",
                        help="heat-map gallery: N cases each of TP, FP, FN (0 = none)")
    parser.add_argument("--batch", type=int, default=64, help="images per score_batch call")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUROC CI")
    parser.add_argument("--seed", type=int, default=0, help="seed for --limit, --cv folds and fitting")
    parser.add_argument("--workers", type=int, default=2, help="image-decoding threads")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    parser.add_argument("--device", default=None,
                        help="torch device to score on: cpu, cuda or auto (cuda where torch sees a GPU); default: "
                             "the settings' device (MEDGRU_DEVICE, auto). The report records it")
    parser.add_argument("--dataset-name", default="", help="name of the data set in the report")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    parser.add_argument("--no-style-baseline", action="store_true",
                        help="skip the lesion-blind style baseline (training/style.py: fitted on the train "
                             "split's normals and anomalies, scored on the evaluation rows)")


# ------------------------------------------------------------------------------------------- helpers
def _resolve_input(path: Path, settings) -> Path:
    if path.exists() or path.is_absolute() or settings.data_root is None:
        return path
    alt = Path(settings.data_root) / path
    return alt if alt.exists() else path


def display_path(path: Path | str, settings=None) -> str:
    """A path for reports: the data root shown as ``$MEDGRU_DATA_ROOT``, the repository as ``.``, the
    temporary folder as ``$TMPDIR``: committed reports carry no machine-specific absolute paths."""
    from medgru.settings import BUNDLED_MODELS_DIR

    text = str(path)
    repo = BUNDLED_MODELS_DIR.parent.parent
    subs: list[tuple[Path, str]] = []
    if settings is not None and settings.data_root is not None:
        subs.append((Path(settings.data_root).resolve(), "$MEDGRU_DATA_ROOT"))
    subs += [(repo.resolve(), "."), (Path(tempfile.gettempdir()).resolve(), "$TMPDIR"),
             (Path.home().resolve(), "~")]
    try:
        p = Path(text).resolve() if os.path.isabs(text) or os.path.exists(text) else None
    except OSError:
        p = None
    if p is None:
        return text
    for base, name in subs:
        try:
            rel = p.relative_to(base)
        except ValueError:
            continue
        return name if str(rel) == "." else f"{name}/{rel.as_posix()}"
    return text


def command_line(args, settings=None) -> str:
    """The ``medgru evaluate`` command that reproduces this run (paths shown with :func:`display_path`)."""
    parts = ["medgru", "evaluate"]
    if args.manifest is not None:
        parts += ["--manifest", display_path(args.manifest, settings)]
    else:
        parts += ["--folder", display_path(args.folder, settings)]
    if args.model is not None:
        parts += ["--model", display_path(args.model, settings)]
    parts += ["--out", display_path(args.out, settings)]
    for flag, value, default in (("--cv", args.cv, 0), ("--limit", args.limit, 0), ("--gallery", args.gallery, 4),
                                 ("--seed", args.seed, 0), ("--bootstrap", args.bootstrap, 1000),
                                 ("--threads", args.threads, 0)):
        if value != default:
            parts += [flag, str(value)]
    if args.dataset_name:
        parts += ["--dataset-name", args.dataset_name]
    return " ".join(p if p.startswith("$") else shlex.quote(p) for p in parts)


def evaluation_rows(rows):
    """Rows of the ``test`` split, or every row when no row has a split."""
    from training.manifest import split_rows

    if not any(r.split for r in rows):
        return list(rows)
    test = split_rows(rows, "test")
    if not test:
        splits = sorted({r.split for r in rows if r.split})
        raise ValueError(f"the manifest has splits {splits} but no 'test' split to evaluate")
    return test


def limit_rows(rows, n: int, seed: int = 0):
    """A class-stratified random subset of about ``n`` rows (at least one of each class), order kept."""
    if n <= 0 or n >= len(rows):
        return list(rows)
    rng = np.random.default_rng(seed)
    labels = sorted({r.label for r in rows})
    keep: list[int] = []
    for lab in labels:
        idx = [i for i, r in enumerate(rows) if r.label == lab]
        k = max(1, int(round(n * len(idx) / len(rows))))
        keep.extend(rng.choice(idx, size=min(k, len(idx)), replace=False).tolist())
    return [rows[i] for i in sorted(keep)]


def _name_of(row, base: Path | None) -> str:
    if base is not None:
        try:
            return row.path.relative_to(base).as_posix()
        except ValueError:
            pass
    return f"{row.path.parent.name}/{row.path.name}"


def _is_normal(row) -> bool:
    from training.metrics import is_normal_label

    return is_normal_label(row.label)


def score_all(det, sequences, batch: int) -> tuple[np.ndarray, float]:
    """Scores of all sequences and the wall time per image."""
    t0 = time.perf_counter()
    parts = [np.asarray(det.score_batch(sequences[i:i + batch]), dtype=np.float64)
             for i in range(0, len(sequences), batch)]
    dt = time.perf_counter() - t0
    scores = np.concatenate(parts) if parts else np.zeros(0)
    if scores.shape != (len(sequences),):
        raise ValueError(f"score_batch returned {scores.shape} scores for {len(sequences)} sequences")
    return scores, dt / max(1, len(sequences))


def judged_rows(det, sequences) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the frames its verdict judges, and the threshold it is judged against as the service judges
    it (the detector's ``series_threshold`` of that number; the single-image threshold for one frame)."""
    frames = np.array([len(s.judged) for s in sequences], dtype=np.int64)
    by_t = {t: det.threshold if t == 1 else det.series_threshold(t) for t in set(frames.tolist())}
    return frames, np.array([by_t[int(t)] for t in frames], dtype=np.float64)


def gallery_frame(detection) -> int:
    """The frame a gallery shows of a row: its only frame, or of a multi-frame row the frame whose score is
    the row's (the highest judged frame; the heat map of a series explains that frame)."""
    scores = np.asarray(detection.frame_scores, dtype=np.float64)
    return int(np.argmin(np.abs(scores - detection.score))) if scores.size > 1 else 0


def pick_gallery(scores: np.ndarray, normal: np.ndarray, threshold: float | np.ndarray, n: int
                 ) -> list[tuple[str, int]]:
    """(kind, index) of the top true positives, false positives and false negatives (``threshold``: one, or
    one per row)."""
    from training.metrics import called_abnormal

    if n <= 0:
        return []
    called = called_abnormal(scores, threshold)
    out: list[tuple[str, int]] = []
    tp = np.where(called & ~normal)[0]
    fp = np.where(called & normal)[0]
    fn = np.where(~called & ~normal)[0]
    out += [("true_positive", int(i)) for i in tp[np.argsort(-scores[tp], kind="stable")][:n]]
    out += [("false_positive", int(i)) for i in fp[np.argsort(-scores[fp], kind="stable")][:n]]
    out += [("false_negative", int(i)) for i in fn[np.argsort(scores[fn], kind="stable")][:n]]
    return out


def make_folds(rows, k: int, seed: int) -> list[np.ndarray]:
    """Fold index (0..k-1) per row: GroupKFold-like when rows carry groups, else shuffled K-fold."""
    n = len(rows)
    if k < 2 or k > n:
        raise ValueError(f"--cv {k}: need 2 <= K <= {n} train normals")
    rng = np.random.default_rng(seed)
    fold = np.empty(n, dtype=np.int64)
    if any(r.group for r in rows):
        groups = [r.group or f"__row{i}" for i, r in enumerate(rows)]
        uniq = sorted(set(groups))
        if len(uniq) < k:
            raise ValueError(f"--cv {k}: only {len(uniq)} groups among the train normals")
        rng.shuffle(uniq)
        # greedy balance: biggest groups first into the currently smallest fold
        sizes = {g: 0 for g in uniq}
        for g in groups:
            sizes[g] += 1
        load = np.zeros(k, dtype=np.int64)
        g2f: dict[str, int] = {}
        for g in sorted(uniq, key=lambda g: -sizes[g]):
            f = int(np.argmin(load))
            g2f[g] = f
            load[f] += sizes[g]
        fold[:] = [g2f[g] for g in groups]
    else:
        perm = rng.permutation(n)
        fold[perm] = np.arange(n) % k
    return [np.where(fold == f)[0] for f in range(k)]


def reframe_augment(training_args: dict[str, Any], seed: int):
    """The ``augment`` of ``fit`` that repeats the model's ``--reframe-copies`` (None without them).

    ``training_args`` are the ``command_args`` of the model folder's ``training.json``. Copy k of the fit
    normals draws from the generator :func:`inference.augment.reframe_copy_seed` gives, as in ``medgru train``."""
    from inference.augment import ReframeParams, reframe_copy_seed, reframe_sequence

    k = int(training_args.get("reframe_copies") or 0)
    if k <= 0:
        return None
    params = ReframeParams.from_options(training_args)

    def augment(seqs):
        out = []
        for c in range(k):
            rng = np.random.default_rng(reframe_copy_seed(seed, c))
            out += [reframe_sequence(s, rng, params) for s in seqs]
        return out

    augment.description = f"{k} randomly re-framed copies of each fit normal ({params.describe()})"
    return augment


def model_training_args(model_dir: Path) -> dict[str, Any]:
    """``command_args`` of the model folder's ``training.json`` ({} where there is none)."""
    path = Path(model_dir) / "training.json"
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text()).get("command_args") or {})


def run_cv(card, train_rows, test_sequences, test_classes, *, k: int, seed: int, batch: int, workers: int,
           n_boot: int, training_args: dict[str, Any] | None = None, on: str = "test",
           n_anomalies: int = 500) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """K-fold CV over the train normals (see the module docstring). ``training_args`` (the model's
    ``training.json`` command arguments) carry what ``fit`` cannot read off the card: re-framed copies.
    ``on``: ``"test"`` scores every twin on ``test_sequences``; ``"validation"`` on its held-out fold's
    normals against ``n_anomalies`` train-split anomalies of ``train_rows`` (0: all), and never reads
    ``test_sequences``."""
    if on not in ("test", "validation"):
        raise ValueError(f"--cv-on {on!r}: 'validation' or 'test'")
    import inspect

    from inference.api import get_detector_class
    from training import metrics as M
    from training.manifest import load_sequences

    normals = [r for r in train_rows if _is_normal(r)]
    folds = make_folds(normals, k, seed)
    log.info("cv: %d folds over %d train normals (grouped: %s)", k, len(normals), any(r.group for r in normals))
    sequences = load_sequences(normals, workers=workers)
    labels = M.binary_labels(test_classes) if on == "test" else None
    anomaly_sequences: list = []
    anomaly_classes: list[str] = []
    if on == "validation":
        anomalies = [r for r in train_rows if not _is_normal(r)]
        if not anomalies:
            raise ValueError("--cv-on validation needs anomalies in the train split")
        if 0 < n_anomalies < len(anomalies):
            keep = np.random.default_rng(seed).permutation(len(anomalies))[:n_anomalies]
            anomalies = [anomalies[i] for i in sorted(keep)]
        anomaly_sequences = load_sequences(anomalies, workers=workers)
        anomaly_classes = [r.label for r in anomalies]
        log.info("cv: scored on each fold's normals against %d train-split anomalies (no test image)",
                 len(anomalies))
    cls = get_detector_class(card.detector)
    out: list[dict[str, Any]] = []
    augment = reframe_augment(training_args or {}, seed)  # fold f's copies use seed + f (below)
    augmented = augment is not None
    if augmented and "augment" not in inspect.signature(cls.fit).parameters:
        raise ValueError(f"--cv: the model was trained with re-framed copies, which {card.detector}'s fit "
                         "cannot repeat")
    for f, held in enumerate(folds):
        held_set = set(held.tolist())
        fit_idx = [i for i in range(len(normals)) if i not in held_set]
        twin = cls(**dict(card.params))
        t0 = time.perf_counter()
        fit_kw = {"augment": reframe_augment(training_args or {}, seed + f)} if augmented else {}
        twin.fit([sequences[i] for i in fit_idx], validation=[sequences[i] for i in held], seed=seed + f,
                 **fit_kw)
        fit_s = time.perf_counter() - t0
        if on == "test":
            scores, _ = score_all(twin, test_sequences, batch)
            fold_classes = list(test_classes)
            fold_labels = labels
        else:  # the held-out normals (which also set the threshold) against the train-split anomalies
            scores, _ = score_all(twin, [sequences[i] for i in held] + anomaly_sequences, batch)
            fold_classes = [normals[i].label for i in held] + anomaly_classes
            fold_labels = M.binary_labels(fold_classes)
        _, fold_thr = judged_rows(twin, test_sequences) if on == "test" else (None, None)
        summ = M.summarize(scores, fold_labels, twin.threshold, classes=fold_classes, n_boot=0,
                           row_thresholds=fold_thr)
        at = summ["at_threshold"]
        row = {"fold": f + 1, "n_fit": len(fit_idx), "n_calibration": int(len(held)), "fit_seconds": fit_s,
               "auroc": summ["auroc"], "auprc": summ["auprc"], "sens_at_95_spec": summ["sens_at_95_spec"],
               "fpr_at_95_sens": summ["fpr_at_95_sens"], "threshold": twin.threshold,
               "per_class_auroc": summ["per_class_auroc"]}
        if on == "test":  # at the threshold: meaningless where the scored normals set it
            for key in ("sensitivity", "specificity", "f1", "accuracy"):
                row[key] = at[key]
        log.info("cv fold %d/%d: AUROC %.4f (fit %.0f s)", f + 1, k, row["auroc"], fit_s)
        out.append(row)
        del twin
    grouped = any(r.group for r in normals)
    settings = {
        "k": k, "seed": seed, "grouped_by": "group" if grouped else None, "n_train_normals": len(normals),
        "detector": card.detector, "params": dict(card.params), "on": on,
        "n_anomalies": len(anomaly_sequences) if on == "validation" else None,
        "description": (
            f"{k}-fold split of the {len(normals)} train-split normals"
            + (" (grouped by patient/group ID, so a group never sits on both sides)" if grouped else "")
            + ". Per fold: an untrained twin of the model (same detector and hyper-parameters) is fitted on "
            "the other folds' normals, its threshold calibrated on the held-out fold's normals, and it is "
            + ("evaluated on the full test split: a figure to report, not to choose a recipe by. "
               if on == "test" else
               f"scored on those held-out normals against {len(anomaly_sequences)} train-split anomalies "
               "(seeded sample, the same for every fold): no test image is read, and the metrics at the "
               "threshold are left out, since the scored normals set it. ")
            + "No anomaly is used for fitting or calibration."
            + (f" As in the model's training, the fit normals are joined by {augment.description}."
               if augment is not None else "")),
    }
    return out, settings


# ------------------------------------------------------------------------------------------- run
#: train images read at a time for the style baseline
STYLE_CHUNK = 256


def run_style_baseline(rows, eval_sequences, eval_normal: np.ndarray, workers: int) -> dict[str, Any]:
    """:func:`training.style.style_baseline` fitted on the manifest's train split (last frame of each row)
    and scored on the evaluation sequences; skipped, with the reason, where there is no train split."""
    from training.manifest import load_sequences, split_rows
    from training.style import style_baseline

    train = split_rows(rows, "train") if any(r.split for r in rows) else []
    if not train:
        return {"auroc": None, "skipped": "the manifest has no train split"}

    def train_frames():  # in chunks: a whole train split of frames need not fit in memory
        for i in range(0, len(train), STYLE_CHUNK):
            for s in load_sequences(train[i:i + STYLE_CHUNK], workers=workers):
                yield s.frames[-1]

    return style_baseline(train_frames(), [_is_normal(r) for r in train],
                          (s.frames[-1] for s in eval_sequences), eval_normal)


def run(args, settings) -> int:
    import torch

    from inference.api import load_model
    from inference.device import resolve_device
    from medgru.settings import BUNDLED_MODELS_DIR
    from training.manifest import load_sequences, read_manifest, rows_from_folder, split_rows
    from training.report import EvaluationResult, GalleryItem, write_report

    try:
        device = resolve_device(args.device or settings.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else BUNDLED_MODELS_DIR / DEFAULT_MODEL_NAME
    if args.manifest is not None:
        src = _resolve_input(Path(args.manifest), settings)
        rows = read_manifest(src)
        base = src.resolve().parent
    else:
        src = _resolve_input(Path(args.folder), settings)
        rows = rows_from_folder(src)
        base = src.resolve()
    try:
        eval_rows = limit_rows(evaluation_rows(rows), args.limit, args.seed)
    except ValueError as exc:  # a split column without a test split
        print(f"error: {exc}", file=sys.stderr)
        return 2
    classes = [r.label.strip().lower() for r in eval_rows]
    normal = np.array([_is_normal(r) for r in eval_rows])
    if normal.all() or (~normal).all():
        print(f"error: the evaluation rows of {src} hold {int(normal.sum())} normal and "
              f"{int((~normal).sum())} anomaly images; both are needed", file=sys.stderr)
        return 2

    cv_rows: list = []
    if args.cv:  # the folds are checked before the test split is scored, not after
        cv_rows = split_rows(rows, "train")
        if args.limit:  # quick look: cap the train normals the folds are made of, too
            tn = [r for r in cv_rows if _is_normal(r)]
            keep = np.random.default_rng(args.seed).permutation(len(tn))[: args.limit]
            cv_rows = [tn[i] for i in sorted(keep)] + [r for r in cv_rows if not _is_normal(r)]
        if not cv_rows:
            print(f"error: --cv needs a 'train' split in {src}", file=sys.stderr)
            return 2
        if args.cv_on == "validation" and all(_is_normal(r) for r in cv_rows):
            print(f"error: --cv-on validation needs anomalies in the train split of {src}", file=sys.stderr)
            return 2
        try:
            make_folds([r for r in cv_rows if _is_normal(r)], args.cv, args.seed)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    try:
        det = load_model(model_dir)
    except (OSError, ValueError, LookupError) as exc:  # no card, a checksum that differs, an unknown detector
        print(f"error: model folder {display_path(model_dir, settings)}: {exc}", file=sys.stderr)
        return 2
    card = det.card
    if hasattr(det, "to") and device != "cpu":
        det.to(device)
    log.info("evaluate: model %s %s (%s) on %d images of %s", card.name, card.version, card.detector,
             len(eval_rows), src)
    t0 = time.perf_counter()
    sequences = load_sequences(eval_rows, workers=args.workers)
    load_s = time.perf_counter() - t0
    # warm-up (first call builds the backbone, allocates buffers): not counted in the timing
    det.score_batch(sequences[:1])
    scores, per_image = score_all(det, sequences, args.batch)
    load_after_scoring = os.getloadavg()[0]
    log.info("scored %d images in %.1f s (%.1f ms/image)", len(scores), per_image * len(scores), 1e3 * per_image)

    detect_times = []
    for s in sequences[: min(5, len(sequences))]:
        t1 = time.perf_counter()
        det.detect(s, explain=False)
        detect_times.append(time.perf_counter() - t1)

    gallery: list[GalleryItem] = []
    explain_times = []
    row_frames, row_thr = judged_rows(det, sequences)
    for kind, i in pick_gallery(scores, normal, row_thr, args.gallery):
        t1 = time.perf_counter()
        d = det.detect(sequences[i], explain=True)
        explain_times.append(time.perf_counter() - t1)
        k = gallery_frame(d)
        gallery.append(GalleryItem(kind=kind, name=_name_of(eval_rows[i], base), label=classes[i],
                                   score=float(d.score), image=sequences[i].frames[k],
                                   heatmap=d.heatmaps[k]))

    cv_folds: list[dict[str, Any]] = []
    cv_settings: dict[str, Any] = {}
    if args.cv:
        cv_folds, cv_settings = run_cv(card, cv_rows, sequences, classes, k=args.cv, seed=args.seed,
                                       batch=args.batch, workers=args.workers, n_boot=0,
                                       training_args=model_training_args(model_dir), on=args.cv_on,
                                       n_anomalies=args.cv_anomalies)

    style = None
    if not args.no_style_baseline:
        style = run_style_baseline(rows, sequences, normal, args.workers)

    timing = {
        "score_batch_seconds_per_image": per_image,
        "detect_seconds_median": float(np.median(detect_times)) if detect_times else None,
        "explain_seconds_median": float(np.median(explain_times)) if explain_times else None,
        "image_loading_seconds_total": load_s,
        "device": str(getattr(det, "device", "cpu")),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "batch": args.batch,
        "cpu_count": os.cpu_count(),
        "load_average_after_scoring": round(load_after_scoring, 2),
    }
    dataset = args.dataset_name or display_path(src, settings)
    notes = [f"Evaluation rows: {'the test split' if any(r.split for r in rows) else 'all rows'} of "
             f"`{display_path(src, settings)}`" + (f", limited to a stratified subset of {len(eval_rows)} "
                                                    f"(--limit {args.limit}, seed {args.seed})"
                                                    if args.limit else "") + "."]
    if card.training_data:
        notes.append(f"Model card training data: {card.training_data}")
    notes += list(args.note)
    result = EvaluationResult(
        scores=scores, classes=classes, names=[_name_of(r, base) for r in eval_rows], threshold=det.threshold,
        model={"name": card.name, "version": card.version, "detector": card.detector,
               "path": display_path(model_dir, settings), "params": dict(card.params)},
        dataset=dataset, command=command_line(args, settings),
        seconds_per_image=per_image, timing=timing, gallery=gallery, cv_folds=cv_folds,
        cv_settings=cv_settings, notes=notes, style_baseline=style,
        row_frames=row_frames.tolist(), row_thresholds=row_thr.tolist(),
    )
    m = write_report(Path(args.out), result, n_boot=args.bootstrap)
    print(f"{card.name} {card.version} on {dataset}: AUROC {m['auroc']:.4f} "
          f"[{m['auroc_ci95'][0]:.4f}, {m['auroc_ci95'][1]:.4f}], AUPRC {m['auprc']:.4f}, "
          f"sens@95spec {m['sens_at_95_spec']:.4f}, FPR@95sens {m['fpr_at_95_sens']:.4f}, "
          f"sens {m['sensitivity']:.4f} / spec {m['specificity']:.4f} at threshold {m['threshold']:.5g}; "
          f"{1e3 * per_image:.1f} ms/image")
    if style is not None and style.get("auroc") is not None:
        print(f"style baseline (lesion-blind, fitted on the train split): AUROC {style['auroc']:.4f}")
    if cv_folds:
        s = m["cv"]["summary"]["auroc"]
        print(f"{args.cv}-fold CV AUROC {s['mean']:.4f} ± {s['std']:.4f}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
