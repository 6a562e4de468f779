"""Batch scoring of a bundled MedGRU-SVC model: one sequence at a time against grouped, on one device.

    MEDGRU_DATA_ROOT=<data> python benchmarks/batch_scoring.py --model inference/bundled/chest-cxr \\
        --manifest <data>/kermany_cxr/manifest.csv [--split test] [--device cuda] [--batch 64] \\
        [--limit N] [--out result.json]

``MedGRUSVC.score_batch`` scores one sequence at a time on the CPU, so that each score is bit for bit the
one ``detect`` gives. On a GPU it groups the sequences of one length (``score_grouped``): one backbone
call and batched encoder calls per batch, instead of launches per image. This measures what grouping buys
on the device asked for, side by side in one process on the same decoded images (each path run twice,
the faster kept; images decoded beforehand, so decoding is not timed), and how far the two paths' scores
differ (largest difference as a share of the scores' spread, Spearman, verdicts, AUROC of each).

A second case, ``--texture-sequences K`` (default 32), does the same for K synthetic T = 8, 224 x 224
sequences: the worker's series shape. Prints and (``--out``) writes a JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def timed(fn: Callable[[], np.ndarray], sync: Callable[[], None], repeats: int = 2) -> tuple[np.ndarray, float]:
    """``fn()``'s result and its best wall time of ``repeats`` runs (after one warm-up call)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return out, best


def compare(one: np.ndarray, grouped: np.ndarray, threshold: float, labels: np.ndarray | None) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from training.metrics import auroc

    diff = np.abs(one - grouped)
    spread = float(np.ptp(one))
    out: dict[str, Any] = {
        "max_abs_difference": float(diff.max()),
        "max_difference_over_spread": float(diff.max() / spread) if spread > 0 else None,
        "spearman": float(spearmanr(one, grouped)[0]) if len(one) > 2 else None,
        "verdicts_differing": int(((one > threshold) != (grouped > threshold)).sum()),
    }
    if labels is not None and 0 < labels.sum() < len(labels):
        out["auroc_one_at_a_time"], out["auroc_grouped"] = auroc(one, labels), auroc(grouped, labels)
    return out


def measure(det: Any, seqs: list, batch: int, sync: Callable[[], None], labels: np.ndarray | None) -> dict[str, Any]:
    def one_at_a_time() -> np.ndarray:
        return np.array([float(det.score_features(det.sequence_features(s)[None])[0]) for s in seqs])

    def grouped() -> np.ndarray:
        return np.concatenate([det.score_grouped(seqs[i:i + batch]) for i in range(0, len(seqs), batch)])

    s_one, t_one = timed(one_at_a_time, sync)
    s_grp, t_grp = timed(grouped, sync)
    return {"n": len(seqs), "frames": int(sum(s.frames.shape[0] for s in seqs)),
            "ms_per_sequence_one_at_a_time": 1000 * t_one / len(seqs),
            "ms_per_sequence_grouped": 1000 * t_grp / len(seqs), "speedup": t_one / t_grp,
            **compare(s_one, s_grp, float(det.threshold), labels)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="MedGRU-SVC model folder")
    ap.add_argument("--manifest", type=Path, default=None, help="images to score (rows of --split)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=0, help="first N rows of the split only (0 = all)")
    ap.add_argument("--texture-sequences", type=int, default=32, help="synthetic T = 8 sequences (0 = none)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--batch", type=int, default=64, help="sequences per score_grouped call")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    from inference.api import load_model
    from inference.device import resolve_device
    from training.manifest import load_sequences, read_manifest, rows_of_split
    from training.metrics import binary_labels

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    det = load_model(args.model, verify=True)
    if not hasattr(det, "score_grouped"):
        raise SystemExit(f"{args.model} is not a MedGRU-SVC model")
    det.to(device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    res: dict[str, Any] = {"model": f"{det.card.name} {det.card.version}", "device": device,
                           "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda")
                           else platform.processor() or platform.machine(),
                           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "batch": args.batch, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.manifest is not None:
        rows = rows_of_split(read_manifest(args.manifest), args.split)
        rows = rows[: args.limit] if args.limit else rows
        seqs = load_sequences(rows, workers=4)
        res["images"] = {"manifest": args.manifest.name, "split": args.split,
                         **measure(det, seqs, args.batch, sync, binary_labels(r.label for r in rows))}
    if args.texture_sequences:
        from benchmarks.bench_inference import synthetic_sequence

        seqs = [synthetic_sequence(8, 224, seed) for seed in range(args.texture_sequences)]
        res["texture_t8"] = measure(det, seqs, args.batch, sync, None)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
