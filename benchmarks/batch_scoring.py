"""Batch scoring of a bundled MedGRU-SVC model: one sequence at a time against grouped, on one device.

    MEDGRU_DATA_ROOT=<data> python benchmarks/batch_scoring.py --model inference/bundled/chest-cxr \\
        --manifest <data>/kermany_cxr/manifest.csv [--split test] [--device cuda] [--batch 64] \\
        [--limit N] [--out result.json]

``MedGRUSVC.score_batch`` scores one sequence at a time on the CPU, so that each score is bit for bit the
one ``detect`` gives. On a GPU it groups the sequences of one length (``score_grouped``): one backbone
call and batched encoder calls per batch, instead of launches per image. This measures what grouping buys
on the device asked for, side by side in one process on the same decoded images (each path run twice,
the faster kept; images decoded beforehand, so decoding is not timed), and how far the two paths' scores
differ (``benchmarks/device/compare_scores.py``'s figures, one-at-a-time as the reference: largest
difference as a share of the scores' spread, Spearman, verdicts, AUROC of each).

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


def measure(det: Any, seqs: list, batch: int, sync: Callable[[], None], labels: np.ndarray | None) -> dict[str, Any]:
    """Scores and best-of-2 wall time of each path (after a warm-up call, whose scores are kept), and how far
    the grouped scores lie from the one-at-a-time ones (``compare_scores.compare_arrays``)."""
    from benchmarks.bench_inference import time_it
    from benchmarks.device.compare_scores import compare_arrays

    def one_at_a_time() -> np.ndarray:
        out = np.array([float(det.score_features(det.sequence_features(s)[None])[0]) for s in seqs])
        sync()
        return out

    def grouped() -> np.ndarray:
        out = np.concatenate([det.score_grouped(seqs[i:i + batch]) for i in range(0, len(seqs), batch)])
        sync()
        return out

    s_one, s_grp = one_at_a_time(), grouped()  # the warm-up calls
    t_one = time_it(one_at_a_time, repeats=2, warmup=0)["min_s"]
    t_grp = time_it(grouped, repeats=2, warmup=0)["min_s"]
    thr = float(det.threshold)
    return {"frames": int(sum(s.frames.shape[0] for s in seqs)),
            "ms_per_sequence_one_at_a_time": 1000 * t_one / len(seqs),
            "ms_per_sequence_grouped": 1000 * t_grp / len(seqs), "speedup": t_one / t_grp,
            **compare_arrays(s_one, s_grp, s_one > thr, s_grp > thr, labels)}


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
