"""Spine latency benchmark: runs the end-to-end Orthanc test and records its timings.

    python benchmarks/bench_spine.py

Runs ``tests/integration/test_spine.py`` (real Orthanc in a network namespace, ``medgru serve`` with
the bundled models) with ``MEDGRU_SPINE_LATENCY_OUT`` pointing at ``benchmarks/results/spine_latency.json``:
the time from the last instance sent to the SR being visible in Orthanc, by route.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "spine_latency.json"

if __name__ == "__main__":
    env = dict(os.environ, MEDGRU_SPINE_LATENCY_OUT=str(OUT))
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", "tests/integration/test_spine.py"], cwd=ROOT, env=env)
    if OUT.is_file():
        print(OUT.read_text())
    sys.exit(rc)
