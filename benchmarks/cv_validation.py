"""K-fold CV of a model's recipe that reads no test image (``medgru evaluate --cv-on validation``, alone).

    python benchmarks/cv_validation.py --dataset brain_mri --model inference/bundled/brain-mr \
        [--k 5] [--seed 0] [--anomalies 500] [--threads 2] [--out benchmarks/results]

``medgru evaluate`` always scores the test split for its report; this script runs only its CV
(:func:`training.evaluate.run_cv` with ``on="validation"``): per fold, an untrained twin of the model is
fitted on the other folds' train-split normals, calibrated on the held-out fold's normals and scored on
those normals against a seeded sample of train-split anomalies, the same for every fold. The test rows are
never loaded. It writes ``cv_validation-<dataset>-<version>.json`` (folds, mean ± std, settings) to
``--out`` and prints the summary. Data root: ``MEDGRU_DATA_ROOT``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = ("auroc", "auprc", "sens_at_95_spec", "fpr_at_95_sens")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a folder of the data root with a manifest.csv")
    parser.add_argument("--model", type=Path, required=True, help="the model folder whose recipe is refitted")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anomalies", type=int, default=500, help="train-split anomalies sampled (0 = all)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from inference.api import load_model
    from training import metrics as M
    from training.evaluate import model_training_args, run_cv
    from training.manifest import read_manifest, split_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    data_root = Path(os.environ.get("MEDGRU_DATA_ROOT", ROOT.parent / "shared" / "data"))
    rows = split_rows(read_manifest(data_root / args.dataset / "manifest.csv"), "train")
    card = load_model(args.model).card
    t0 = time.perf_counter()
    folds, settings = run_cv(card, rows, [], [], k=args.k, seed=args.seed, batch=args.batch,
                             workers=args.workers, n_boot=0, training_args=model_training_args(args.model),
                             on="validation", n_anomalies=args.anomalies)
    seconds = time.perf_counter() - t0
    summary = M.aggregate_folds(folds, KEYS)
    result = {"dataset": args.dataset, "model": card.name, "version": card.version, "seconds": seconds,
              "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "command": "python benchmarks/cv_validation.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": settings, "folds": folds, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cv_validation-{args.dataset}-{card.version}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{card.name} {card.version}: validation CV ({args.k} folds, {settings['n_anomalies']} train-split "
          f"anomalies, {seconds:.0f} s)")
    for key in KEYS:
        print(f"  {key}: {summary[key]['mean']:.4f} ± {summary[key]['std']:.4f}  "
              f"({', '.join(f'{f[key]:.3f}' for f in folds)})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
