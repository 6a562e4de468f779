"""The recorded software environment, and the constraints file that makes a fresh machine match it."""

import json
import re
import tomllib
from pathlib import Path

from training.environment import DISTRIBUTIONS, software_environment

ROOT = Path(__file__).resolve().parents[2]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)", line)
            assert m, f"not an exact pin: {line!r}"
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_software_environment_names_every_distribution():
    env = software_environment()
    assert set(DISTRIBUTIONS) <= set(env)
    assert env["torch"].startswith("2.13.0")  # the pinned build is what the tests run under


def test_constraints_pin_every_distribution_but_torch_exactly():
    # torch is pinned in pyproject.toml (it must be installed first, from the CPU build on disk)
    assert set(constraints()) == {d.lower() for d in DISTRIBUTIONS} - {"torch"}
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps


def test_constraints_match_the_bundled_chest_models_training_environment():
    """So that `pip install -c constraints.txt` reproduces the numerics the bundled model was trained with;
    a model retrained under other versions must bring the file along."""
    env = json.loads((ROOT / "inference" / "bundled" / "chest-cxr" / "training.json").read_text())["environment"]
    pins = constraints()
    assert {k: env[k] for k in DISTRIBUTIONS if k != "torch"} == {k: pins[k.lower()] for k in DISTRIBUTIONS
                                                                 if k != "torch"}
    assert env["torch"].split("+")[0] == "2.13.0"
