"""DCMTK command-line tools, run inside the test network namespace.

Always by absolute path: pynetdicom installs Python scripts named ``storescu``/``echoscu``... that shadow
DCMTK on ``PATH``. ``TCP_NODELAY=1`` goes into their environment (DCMTK reads it to set the socket option).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Sequence

from tests.integration.netns import NetNamespace

ECHOSCU = "/usr/bin/echoscu"
STORESCU = "/usr/bin/storescu"
DSRDUMP = "/usr/bin/dsrdump"


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def require_dcmtk() -> None:
    missing = [tool for tool in (ECHOSCU, STORESCU, DSRDUMP) if not Path(tool).is_file()]
    assert not missing, f"DCMTK tools missing: {missing} (apt-get install dcmtk)"


def echoscu(
    ns: NetNamespace, port: int, *, calling: str, called: str, host: str = "127.0.0.1", timeout_s: int = 10
) -> subprocess.CompletedProcess:
    """One C-ECHO from inside ``ns``; returncode 0 means the association and the echo succeeded."""
    argv = [ECHOSCU, "-aet", calling, "-aec", called, "-to", str(timeout_s), "-ta", str(timeout_s), host, str(port)]
    return ns.run(argv, env=dcmtk_env(), timeout=timeout_s + 20)


def storescu(
    ns: NetNamespace,
    port: int,
    files: Sequence[Path],
    *,
    calling: str,
    called: str,
    host: str = "127.0.0.1",
    timeout_s: int = 30,
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """Send ``files`` in one association from inside ``ns`` (storescu's default presentation contexts).

    DCMTK storescu exits 0 even when the peer rejects individual instances; callers check the output
    (``-v`` logs each C-STORE response status) or the peer's content.
    """
    argv = [
        STORESCU,
        "-v",
        "-aet",
        calling,
        "-aec",
        called,
        "-to",
        str(timeout_s),
        "-ta",
        str(timeout_s),
        *extra,
        host,
        str(port),
        *[os.fspath(f) for f in files],
    ]
    return ns.run(argv, env=dcmtk_env(), timeout=timeout_s + 120)


def dsrdump(path: Path) -> str:
    """``dsrdump`` of an SR file, values converted to UTF-8 (no network needed: runs on the host)."""
    proc = subprocess.run(
        [DSRDUMP, "+U8", "-Ee", "-Ec", os.fspath(path)], capture_output=True, timeout=60
    )
    stdout = proc.stdout.decode("utf-8", errors="replace")
    stderr = proc.stderr.decode("utf-8", errors="replace")
    assert proc.returncode == 0, f"dsrdump failed on {path}: rc={proc.returncode}\n{stderr}\n{stdout}"
    return stdout
