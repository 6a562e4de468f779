"""The layer rules of pyproject.toml's import-linter contracts hold."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: " in proc.stdout and " broken" in proc.stdout
    assert "0 broken" in proc.stdout, proc.stdout


def test_no_bare_except_pass():
    offenders = []
    for path in ROOT.glob("*/**/*.py"):
        if any(part in {".venv", "build", "tests"} for part in path.parts):
            continue
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.strip() in {"except:", "except Exception:", "except BaseException:"} and lines[i + 1].strip() == "pass":
                offenders.append(f"{path.relative_to(ROOT)}:{i + 1}")
    assert not offenders, offenders
