"""Does the service score an image as `medgru evaluate` does? The same pixels through both loaders.

The bundled models were trained and evaluated on 8-bit image files, read by ``training.manifest``
(grey value / 255). The service reads DICOM through ``worker.pixels`` (modality LUT, then the VOI:
the image's window, else its VOI LUT, else, for an image of at most 8 bits with no rescale, its stored
range (v / 255), else for MR the frame's own minimum to maximum, else a robust 0.5-99.5 percentile
window). This script takes every
image of a benchmark's test split, wraps its pixels, unchanged, into a DICOM dataset (written to bytes
and read back with pydicom, as the spool does), decodes it with the worker's own ``decode_frame`` and
scores it with the bundled model. Encodings (what a PACS may hold for such an image):

* ``8-bit, no VOI``: BitsStored 8, MONOCHROME2, no window (a Secondary Capture of a rendered image);
* ``8-bit, full-range window``: the same with Window Center 127.5 / Width 255, LINEAR_EXACT (maps v to v / 255);
* ``12-bit, full-range window``: the grey values scaled onto 0-4095 (BitsStored 12), with Window Center
  2047.5 / Width 4095, LINEAR_EXACT: the same frame as the file (to 1/4095), told it came from 12 bits;
* ``12-bit, no VOI``: the grey values scaled onto 0-4095, no window;
* ``8-bit, enlarged x8``: the image enlarged eight times (bicubic, 1792 px on a side), no VOI, as a
  stand-in for a radiograph at its native size (the benchmark sets were published at 224 x 224): the
  model shrinks it back; its frame difference is not reported (the sizes differ).

Rows marked "before 2026-12-04" score the same encodings as the service did until then, side by side in
the same run: the robust window for an 8-bit image without a VOI (now its stored range), and MedGRU-SVC's
CLAHE at the image's stored depth (now at most ``MedGRUSVC.clahe_bits``, 8, the training depth), and
CLAHE before resizing to the model's input size (now after: ``inference/preprocess.py``). The row marked
"before 2026-12-07" is the percentile window that an MR frame of more than 8 bits without a VOI got until
then (now its minimum to maximum: ``benchmarks/results/mr_no_voi_window.md``).

Reported per encoding, against the file path: the largest frame difference (grey levels of 255), the
Spearman correlation of the scores, the share of verdicts that differ at the model's threshold, and the
test AUROC of each path. Labels are used only to report the AUROC; nothing is chosen here.

    MEDGRU_DATA_ROOT=<data> python benchmarks/serving_consistency.py [--dataset kermany_cxr] [--limit N]

Writes ``benchmarks/results/serving_consistency.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATASETS = {"kermany_cxr": ("Kermany CXR", "chest-cxr", "DX"), "brain_mri": ("Brain MRI", "brain-mr", "MR")}
ENCODINGS = ("8-bit, no VOI", "8-bit, full-range window", "12-bit, full-range window", "12-bit, no VOI",
             "8-bit, enlarged x8")
ENLARGE = 8
CHUNK = 64
#: what the service did before the date in each row's name: (row name, encoding, the old step). The old
#: steps: "robust window" (the 0.5-99.5 percentile window, whatever the depth and modality), "CLAHE at 12
#: bits" (at the stored depth) and "CLAHE before resizing"
BEFORE = (("before 2026-12-04: 8-bit, no VOI (robust window)", "8-bit, no VOI", "robust window"),
          ("before 2026-12-04: 12-bit, full-range window (CLAHE at 12 bits)", "12-bit, full-range window",
           "CLAHE at 12 bits"),
          ("before 2026-12-04: 12-bit, no VOI (CLAHE at 12 bits)", "12-bit, no VOI", "CLAHE at 12 bits"),
          ("before 2026-12-04: 8-bit, enlarged x8 (CLAHE before resizing)", "8-bit, enlarged x8",
           "CLAHE before resizing"),
          ("before 2026-12-07: 12-bit, no VOI (percentile window)", "12-bit, no VOI", "robust window"))


def clahe_then_resize(frames, *, bits_stored=8, size=224, clip_limit=2.0, tile_grid=8):
    """MedGRU-SVC's preprocessing as it was until 2026-12-04: CLAHE at the native size, then resize."""
    from inference.preprocess import clahe, resize

    out = [resize(clahe(f, bits_stored=bits_stored, clip_limit=clip_limit, tile_grid=tile_grid), size)
           for f in np.asarray(frames)]
    return np.clip(np.stack(out), 0.0, 1.0).astype(np.float32)


def to_dicom(grey8: np.ndarray, encoding: str, modality: str):
    """``grey8`` (H, W) uint8 pixels as a DICOM dataset, round-tripped through bytes."""
    import cv2
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = grey8.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    if encoding == "8-bit, enlarged x8":
        h, w = grey8.shape
        grey8 = np.clip(np.rint(cv2.resize(grey8.astype(np.float32), (w * ENLARGE, h * ENLARGE),
                                           interpolation=cv2.INTER_CUBIC)), 0, 255).astype(np.uint8)
        ds.Rows, ds.Columns = grey8.shape
    if encoding.startswith("12-bit"):
        values = np.rint(grey8.astype(np.float64) * 4095.0 / 255.0).astype(np.uint16)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    else:
        values = grey8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    if encoding == "8-bit, full-range window":
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 127.5, 255, "LINEAR_EXACT"
    if encoding == "12-bit, full-range window":
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2047.5, 4095, "LINEAR_EXACT"
    ds.PixelData = np.ascontiguousarray(values).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def measure(dataset: str, data_root: Path, limit: int | None, seed: int) -> dict:
    from scipy.stats import spearmanr

    from inference.api import FrameSequence, load_model
    from training.manifest import load_frames, read_manifest, rows_of_split
    from training.metrics import auroc
    from worker.pixels import _robust_window, decode_frame

    title, bundle, modality = DATASETS[dataset]
    rows = rows_of_split(read_manifest(data_root / dataset / "manifest.csv"), "test")
    if limit and len(rows) > limit:
        rng = np.random.default_rng(seed)
        rows = [rows[i] for i in sorted(rng.choice(len(rows), size=limit, replace=False))]
    model_dir = REPO / "inference" / "bundled" / bundle
    det = load_model(model_dir)
    card = json.loads((model_dir / "card.json").read_text())
    thr = float(det.threshold)
    labels = np.array([0 if r.is_normal else 1 for r in rows])

    import inference.detectors.medgru_svc as medgru_module

    file_seqs = [load_frames(r) for r in rows]

    def served(fs, enc: str, old_step: str | None):
        """One test image as the service reads it from ``enc`` (the frame and its stored depth)."""
        grey8 = np.rint(fs.frames[0] * 255.0).astype(np.uint8)
        ds = to_dicom(grey8, enc, modality)
        if old_step == "robust window":
            frame = _robust_window(ds.pixel_array.astype(np.float64)).astype(np.float32)
        else:
            frame = decode_frame(ds, 1, str(ds.SOPInstanceUID)).astype(np.float32)
        return FrameSequence(frames=np.clip(frame, 0, 1)[None], modality=modality, bits_stored=int(ds.BitsStored))

    t0 = time.perf_counter()
    scores = {"file (training.manifest)": det.score_batch(file_seqs)}
    max_diff = {}
    current_preprocess = medgru_module.preprocess_frames
    try:
        for name, enc, old_step in [(e, e, None) for e in ENCODINGS] + list(BEFORE):
            det.clahe_bits = 16 if old_step == "CLAHE at 12 bits" else type(det).clahe_bits
            medgru_module.preprocess_frames = (clahe_then_resize if old_step == "CLAHE before resizing"
                                               else current_preprocess)
            out, worst = [], 0.0
            for i in range(0, len(rows), CHUNK):  # in chunks: an enlarged test split does not fit in memory
                seqs = [served(fs, enc, old_step) for fs in file_seqs[i:i + CHUNK]]
                for fs, seq in zip(file_seqs[i:i + CHUNK], seqs):
                    if seq.frames[0].shape == fs.frames[0].shape:
                        worst = max(worst, float(np.abs(seq.frames[0] - fs.frames[0]).max()) * 255.0)
                    else:
                        worst = float("nan")
                out.append(det.score_batch(seqs))
            scores[name] = np.concatenate(out)
            max_diff[name] = worst
    finally:
        det.clahe_bits = type(det).clahe_bits
        medgru_module.preprocess_frames = current_preprocess
    seconds = time.perf_counter() - t0
    ref = scores["file (training.manifest)"]
    out = {"dataset": title, "model": f"{card['name']} {card['version']}", "threshold": thr,
           "n_normal": int((labels == 0).sum()), "n_anomaly": int((labels == 1).sum()),
           "seconds_wrapping_decoding_scoring": round(seconds, 1), "paths": {}}
    for name, s in scores.items():
        row = {"auroc": round(auroc(s, labels), 4), "flagged": round(float((s > thr).mean()), 4)}
        if s is not ref:
            row.update({
                "max_frame_difference_grey_levels": (round(max_diff[name], 3) if np.isfinite(max_diff[name])
                                                     else None),
                "spearman_vs_file": round(float(spearmanr(ref, s).statistic), 4),
                "verdicts_differing": int(((s > thr) != (ref > thr)).sum()),
                "median_abs_score_change_over_threshold": round(float(np.median(np.abs(s - ref)) / abs(thr)), 4),
            })
        out["paths"][name] = row
    return out


def to_markdown(results: list[dict], command: str) -> str:
    lines = ["# The service's DICOM loader against the training loader, same pixels", "",
             f"Command: `{command}` (data root from `MEDGRU_DATA_ROOT`). Protocol: the script's docstring.", ""]
    for r in results:
        lines += [f"## {r['dataset']}: `{r['model']}` (threshold {r['threshold']:.4g}; test split "
                  f"{r['n_normal']} normal / {r['n_anomaly']} anomalous)", "",
                  "| path | max frame difference (grey levels /255) | Spearman vs file | verdicts differing "
                  "| median abs score change / threshold | flagged | test AUROC |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, p in r["paths"].items():
            if "spearman_vs_file" in p:
                diff = p["max_frame_difference_grey_levels"]
                lines.append(f"| {name} | {'–' if diff is None else f'{diff:.2f}'} | {p['spearman_vs_file']:.4f} "
                             f"| {p['verdicts_differing']} | {p['median_abs_score_change_over_threshold']:.4f} "
                             f"| {p['flagged']:.3f} | {p['auroc']:.4f} |")
            else:
                lines.append(f"| {name} (reference) | 0 | 1 | 0 | 0 | {p['flagged']:.3f} | {p['auroc']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), action="append",
                    help="repeatable; default: both")
    ap.add_argument("--limit", type=int, default=None, help="a seeded sample of this many test images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serving_consistency.json")
    args = ap.parse_args(argv)
    if not os.environ.get("MEDGRU_DATA_ROOT"):
        raise SystemExit("set MEDGRU_DATA_ROOT to the benchmark data folder")
    data_root = Path(os.environ["MEDGRU_DATA_ROOT"])
    datasets = args.dataset or sorted(DATASETS)
    results = [measure(d, data_root, args.limit, args.seed) for d in datasets]
    command = "python benchmarks/serving_consistency.py" + "".join(f" --dataset {d}" for d in args.dataset or []) \
        + (f" --limit {args.limit}" if args.limit else "")
    payload = {"command": command, "cpu": platform.processor() or platform.machine(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    md = to_markdown(results, command)
    args.out.with_name(args.out.stem + ".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
