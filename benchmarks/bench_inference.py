"""Inference speed: score, and score + heat map (Grad-CAM), of one T=8 224x224 sequence.

For every bundled model (``inference/bundled/*``) and the ``knn-effnet`` baseline, side by side, on the
CPU with 2 torch threads (and on the GPU when CUDA is available). Each figure is the median of
``--repeats`` runs after ``--warmup`` unmeasured runs. Goals (issue): <= 0.10 s to score, <= 0.20 s
with Grad-CAM, per T=8 sequence on 2 CPU threads.

    python benchmarks/bench_inference.py [--knn-model DIR] [--repeats 15]

Without ``--knn-model`` the baseline is fitted here on 64 train normals of the Kermany manifest (under
``$MEDGRU_DATA_ROOT``; its patch memory has its full default size, so its timing is representative,
only its pooled memory is smaller), or on synthetic textures when the data are absent.
Prints a table and writes ``benchmarks/results/inference_speed.json``. A benchmark, not a test: the
figures depend on the machine and on its load (the load average is recorded with them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GOAL_SCORE_S = 0.10
GOAL_EXPLAIN_S = 0.20


def synthetic_sequence(t: int = 8, size: int = 224, seed: int = 0):
    import cv2

    from inference.api import FrameSequence

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(t):
        n = cv2.GaussianBlur(rng.normal(size=(size, size)).astype(np.float32), (0, 0), 6.0)
        n = (n - n.min()) / (n.max() - n.min() + 1e-6)
        frames.append(0.15 + 0.7 * n)
    return FrameSequence(frames=np.stack(frames).astype(np.float32), modality="CR", body_part="CHEST",
                         bits_stored=8)


def real_sequence(data_root: Path, t: int = 8):
    """T consecutive Kermany test images stacked as one sequence (content only matters for realism)."""
    from inference.api import FrameSequence
    from training.manifest import load_frames, read_manifest

    rows = [r for r in read_manifest(data_root / "kermany_cxr" / "manifest.csv") if r.split == "test"][:t]
    frames = np.concatenate([load_frames(r).frames for r in rows])
    return FrameSequence(frames=frames, modality="CR", body_part="CHEST", bits_stored=8)


def bench_sequence(t: int = 8):
    """The benchmarks' sequence and the data root it came from: ``real_sequence`` of ``MEDGRU_DATA_ROOT`` (else
    ``../shared/data`` beside the checkout) where that folder holds the data, else ``synthetic_sequence`` and
    ``None``."""
    data_root = Path(os.environ["MEDGRU_DATA_ROOT"]) if os.environ.get("MEDGRU_DATA_ROOT") else \
        (REPO.parent / "shared" / "data")
    if not (data_root / "README.md").is_file():
        return synthetic_sequence(t), None
    return real_sequence(data_root, t), data_root


def fit_knn(data_root: Path | None, out_dir: Path) -> Path:
    from inference.api import ModelCard, Scope, get_detector_class, save_model, sha256_file

    cls = get_detector_class("knn-effnet")
    det = cls(name="knn-effnet-bench")
    if data_root is not None and (data_root / "kermany_cxr" / "manifest.csv").is_file():
        from training.manifest import load_sequences, read_manifest

        rows = [r for r in read_manifest(data_root / "kermany_cxr" / "manifest.csv")
                if r.split == "train" and r.label == "normal"][:64]
        seqs = load_sequences(rows)
        source = "64 Kermany train normals"
    else:
        seqs = [synthetic_sequence(1, seed=100 + i) for i in range(64)]
        source = "64 synthetic textures"
    det.fit(seqs[:48], validation=seqs[48:], seed=0)
    files = save_model(det, out_dir)
    ModelCard(name="knn-effnet-bench", version="1.0.0", detector="knn-effnet", scope=Scope(("CR",)),
              files={f: sha256_file(out_dir / f) for f in files}, params=det.get_params(),
              training_data=source).write(out_dir)
    return out_dir


def time_it(fn, repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": repeats}


def bench_model(model_dir: Path, seq, device: str, repeats: int, warmup: int, optimised: bool = True) -> dict:
    import torch

    from inference import backbone
    from inference.api import load_model

    backbone.set_optimised(optimised)

    det = load_model(model_dir)
    if device != "cpu":
        det.to(device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def score():
        det.score_batch([seq])
        sync()

    def explain():
        det.detect(seq, explain=True)
        sync()

    out = {"model": det.card.name, "version": det.card.version, "detector": det.card.detector,
           "device": device, "backbone": "frozen channels-last TorchScript" if optimised and device == "cpu"
           else "eager PyTorch"}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out["score"] = time_it(score, repeats, warmup)
    if device.startswith("cuda"):
        out["score"]["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    out["score_and_heatmap"] = time_it(explain, repeats, warmup)
    if device.startswith("cuda"):
        out["score_and_heatmap"]["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if device == "cpu":
        out["meets_score_goal"] = out["score"]["median_s"] <= GOAL_SCORE_S
        out["meets_heatmap_goal"] = out["score_and_heatmap"]["median_s"] <= GOAL_EXPLAIN_S
    if device != "cpu":
        det.to("cpu")
    backbone.set_optimised(True)
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def add_ratios(rows: list[dict], devices: list[str]) -> None:
    """Per device: each row's time over the k-NN baseline's (its optimised trunk where there is one: on the
    CPU; on a GPU every row runs eager), and for each optimised row the eager row of the same model *and
    version* over it."""
    for device in devices:
        knn = [r for r in rows if r["device"] == device and r["detector"] == "knn-effnet"]
        base = [r for r in knn if r["backbone"] != "eager PyTorch"] or knn
        if not base:
            continue
        b = base[-1]
        for r in rows:
            if r["device"] != device:
                continue
            r.pop("speedup_over_eager_backbone", None)
            eager = [e for e in rows if e["device"] == device and e["model"] == r["model"]
                     and e["version"] == r["version"] and e["backbone"] == "eager PyTorch"]
            if eager and r["backbone"] != "eager PyTorch":
                r["speedup_over_eager_backbone"] = {
                    "score": eager[-1]["score"]["median_s"] / r["score"]["median_s"],
                    "score_and_heatmap": eager[-1]["score_and_heatmap"]["median_s"] / r["score_and_heatmap"]["median_s"],
                }
            r["ratio_to_knn_baseline"] = {
                "score": r["score"]["median_s"] / b["score"]["median_s"],
                "score_and_heatmap": r["score_and_heatmap"]["median_s"] / b["score_and_heatmap"]["median_s"],
            }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--knn-model", type=Path, help="a trained knn-effnet model folder (else fitted here)")
    p.add_argument("--model", type=Path, action="append", default=[],
                   help="model folders to time (default: every bundled model)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--no-eager", action="store_true",
                   help="skip the side-by-side run with the eager (unoptimised) backbone on the CPU")
    p.add_argument("--note", default="", help="a remark stored with the figures (e.g. machine conditions)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "inference_speed.json")
    args = p.parse_args(argv)

    import torch

    from inference.api import discover_model_dirs
    from medgru.settings import BUNDLED_MODELS_DIR

    torch.set_num_threads(args.threads)
    seq, data_root = bench_sequence(args.frames)
    models = discover_model_dirs(args.model or [BUNDLED_MODELS_DIR])
    tmp = None
    if args.knn_model:
        models.append(args.knn_model)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="knn-bench-")
        models.append(fit_knn(data_root, Path(tmp.name)))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        modes = [True] + ([False] if device == "cpu" and not args.no_eager else [])
        for m in models:
            for optimised in modes:  # interleaved per model: load drifts hit both alike
                r = bench_model(m, seq, device, args.repeats, args.warmup, optimised)
                rows.append(r)
                print(f"{r['model']:<22} {device:<5} {r['backbone'][:6]:<6} score {1e3 * r['score']['median_s']:7.1f} ms   "
                      f"score+heatmap {1e3 * r['score_and_heatmap']['median_s']:7.1f} ms", flush=True)
    add_ratios(rows, devices)
    result = {
        "what": f"one T={args.frames} sequence of {seq.frames.shape[1]}x{seq.frames.shape[2]} frames: "
                "score = score_batch([seq]); score_and_heatmap = detect(seq, explain=True)",
        "goals_s": {"score": GOAL_SCORE_S, "score_and_heatmap": GOAL_EXPLAIN_S, "cpu_threads": 2},
        "input": "Kermany test images" if data_root is not None else "synthetic textures",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python benchmarks/bench_inference.py" + (" --knn-model DIR" if args.knn_model else "")
                   + (f" --repeats {args.repeats}" if args.repeats != 15 else "")
                   + (" --no-eager" if args.no_eager else ""),
        "results": rows,
    }
    if args.note:
        result["note"] = args.note
    print()
    print(f"{'model':<22} {'device':<6} {'trunk':<6} {'score ms':>9} {'+heatmap ms':>12} {'x knn (score)':>14} {'goal':>6}")
    for r in rows:
        ratio = r.get("ratio_to_knn_baseline", {}).get("score")
        ratio_s = "-" if ratio is None else f"{ratio:.2f}"
        goal = "" if r["device"] != "cpu" else ("met" if r["meets_score_goal"] and r["meets_heatmap_goal"] else "MISSED")
        print(f"{r['model']:<22} {r['device']:<6} {r['backbone'][:6]:<6} {1e3 * r['score']['median_s']:9.1f} "
              f"{1e3 * r['score_and_heatmap']['median_s']:12.1f} {ratio_s:>14} {goal:>6}")
    print(f"load average during the run: {result['load_average_1_5_15']}; "
          f"GLIBC_TUNABLES={result['glibc_tunables']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
