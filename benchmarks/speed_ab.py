"""Two model folders timed interleaved (A B, B A, A B ...) on one T-frame sequence; the ratio is the figure.

``bench_inference.py`` times one model after the other. On a shared machine whose load drifts, that order
alone can move a model by 10-20 %. Here every round times both models, one right after the other, and
their order alternates by round, so drift hits both alike.

    python benchmarks/speed_ab.py --model inference/bundled/brain-mr --model OTHER_FOLDER \\
        [--rounds 25] [--threads 2] [--frames 8] [--out benchmarks/results/speed_ab.json]

It prints and writes (JSON) the median time to score and to score with the heat map, and the ratio of the
second model to the first. The models run as ``load_model`` gives them, with the service's default frozen
channels-last backbone on the CPU. Data: ``bench_inference.bench_sequence`` (Kermany test images where the
data are, else synthetic textures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_inference import bench_sequence, cpu_model  # noqa: E402


def interleaved(dets: list, seq, rounds: int, warmup: int = 3) -> list[dict[str, list[float]]]:
    """Per model: the times (s) of ``detect(explain=False)`` and ``detect(explain=True)``, round by round."""
    for d in dets:
        for _ in range(warmup):
            d.detect(seq, explain=True)
    times = [{"score": [], "heatmap": []} for _ in dets]
    for r in range(rounds):
        order = range(len(dets)) if r % 2 == 0 else reversed(range(len(dets)))
        for i in order:
            t0 = time.perf_counter()
            dets[i].detect(seq, explain=False)
            times[i]["score"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dets[i].detect(seq, explain=True)
            times[i]["heatmap"].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", required=True, help="twice: A, then B")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "speed_ab.json")
    ns = ap.parse_args(argv)
    if len(ns.model) != 2:
        ap.error("give --model exactly twice")
    import torch

    from inference.api import load_model

    torch.set_num_threads(ns.threads)
    seq, root = bench_sequence(ns.frames)
    dets = [load_model(m) for m in ns.model]
    times = interleaved(dets, seq, ns.rounds)
    rows = [{"model": f"{d.card.name} {d.card.version}",
             "score_ms": round(1e3 * statistics.median(t["score"]), 1),
             "heatmap_ms": round(1e3 * statistics.median(t["heatmap"]), 1)} for d, t in zip(dets, times)]
    ratio = {k: round(rows[1][f"{k}_ms"] / rows[0][f"{k}_ms"], 3) for k in ("score", "heatmap")}
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "cpu": cpu_model(), "threads": ns.threads, "frames": ns.frames,
           "rounds": ns.rounds, "input": "Kermany test images" if root is not None else "synthetic textures",
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "load_average": list(os.getloadavg()),
           "rows": rows, "ratio_second_to_first": ratio}
    for r in rows:
        print(f"{r['model']:32s} score {r['score_ms']:7.1f} ms   + heat map {r['heatmap_ms']:7.1f} ms")
    print(f"ratio (second / first): score {ratio['score']:.3f}, + heat map {ratio['heatmap']:.3f}")
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
