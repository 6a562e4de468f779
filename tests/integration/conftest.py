"""Integration fixtures: a private network namespace, a real Orthanc in it, and ``medgru serve`` beside it.

Topology (all on the namespace's own 127.0.0.1):

    Orthanc  AE ORTHANC  DICOM 4242, HTTP 8042   knows modalities: medgru (MEDGRU:11112), storescu (STORESCU)
    medgru   AE MEDGRU   DICOM 11112             destination ORTHANC@127.0.0.1:4242, allows ORTHANC, STORESCU

Processes inside are started with ``ip netns exec``; the test process reaches Orthanc's REST API through
``NetNamespace.call`` (see ``tests/integration/netns.py``). Logs of Orthanc and of the service are attached
to the report of any failing test that used them. The service uses the embedded defaults (SQLite and the
filesystem broker under its temporary ``MEDGRU_HOME``), which need no network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.dcmtk import echoscu, require_dcmtk
from tests.integration.netns import NetNamespace, stop_process, tail
from tests.integration.orthanc import Modality, OrthancServer

REPO_ROOT = Path(__file__).resolve().parents[2]

MEDGRU_AET = "MEDGRU"
MEDGRU_PORT = 11112
ORTHANC_AET = "ORTHANC"
STORESCU_AET = "STORESCU"
ORTHANC_MODALITY_NAME = "medgru"  # how Orthanc calls our service in /modalities
QUIET_PERIOD_S = 2.0
SERVICE_START_TIMEOUT_S = 180.0


def env_without_medgru() -> dict[str, str]:
    """The current environment minus any MEDGRU_* variable, so a developer's own settings never leak in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MEDGRU_")}


@dataclass
class MedgruService:
    """A running ``medgru serve`` inside the namespace."""

    ns: NetNamespace
    home: Path
    env: dict[str, str]
    ae_title: str = MEDGRU_AET
    port: int = MEDGRU_PORT
    process: subprocess.Popen | None = None
    log_path: Path = field(default=Path("medgru-serve.log"))

    def medgru(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run another ``medgru`` command (e.g. ``jobs list``) with the service's settings, on the host."""
        return subprocess.run(
            [sys.executable, "-m", "medgru.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
        )

    def log_tail(self, max_chars: int = 20_000) -> str:
        return tail(self.log_path, max_chars)


def _service_env(home: Path, orthanc: OrthancServer, data_root: Path) -> dict[str, str]:
    env = env_without_medgru()
    env.update(
        {
            "MEDGRU_HOME": str(home),
            "MEDGRU_DATA_ROOT": str(data_root),
            "MEDGRU_AE_TITLE": MEDGRU_AET,
            "MEDGRU_LISTEN_HOST": "127.0.0.1",
            "MEDGRU_LISTEN_PORT": str(MEDGRU_PORT),
            "MEDGRU_DESTINATION": f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
            "MEDGRU_QUIET_PERIOD_S": str(QUIET_PERIOD_S),
            "MEDGRU_ALLOWED_CALLING_AES": f"{ORTHANC_AET},{STORESCU_AET}",
            "MEDGRU_SEND_RETRY_BASE_S": "1",
            "MEDGRU_DEVICE": "cpu",
            "MEDGRU_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            "TCP_NODELAY": "1",
        }
    )
    return env


# fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def netns():
    require_dcmtk()
    ns = NetNamespace().create()
    try:
        yield ns
    finally:
        ns.destroy()


@pytest.fixture(scope="session")
def orthanc(netns: NetNamespace, tmp_path_factory: pytest.TempPathFactory):
    server = OrthancServer(
        netns,
        tmp_path_factory.mktemp("orthanc"),
        aet=ORTHANC_AET,
        modalities={
            ORTHANC_MODALITY_NAME: Modality(MEDGRU_AET, "127.0.0.1", MEDGRU_PORT),
            "storescu": Modality(STORESCU_AET, "127.0.0.1", 104),
        },
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def medgru_service(netns: NetNamespace, orthanc: OrthancServer, data_root: Path, tmp_path_factory):
    """``medgru serve`` in the namespace; ready once a C-ECHO from STORESCU succeeds."""
    workdir = tmp_path_factory.mktemp("medgru")
    home = workdir / "home"
    service = MedgruService(netns, home, _service_env(home, orthanc, data_root), log_path=workdir / "serve.log")
    log = open(service.log_path, "ab")
    try:
        service.process = netns.popen(
            ["nice", "-n", "5", sys.executable, "-m", "medgru.cli", "serve"],
            env=service.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
        )
    finally:
        log.close()
    deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
    last = ""
    while True:
        if service.process.poll() is not None:
            pytest.fail(
                f"`medgru serve` exited with status {service.process.returncode} during start-up\n"
                f"{service.log_tail()}"
            )
        probe = echoscu(netns, MEDGRU_PORT, calling=STORESCU_AET, called=MEDGRU_AET, timeout_s=5)
        if probe.returncode == 0:
            break
        last = (probe.stdout + probe.stderr).strip()
        if time.monotonic() > deadline:
            stop_process(service.process)
            pytest.fail(
                f"`medgru serve` did not answer C-ECHO on port {MEDGRU_PORT} within "
                f"{SERVICE_START_TIMEOUT_S:.0f} s; last echoscu: {last}\n{service.log_tail()}"
            )
        time.sleep(1.0)
    try:
        yield service
    finally:
        status = stop_process(service.process, grace_s=30.0)
        print(f"\n`medgru serve` stopped with status {status}")


# failure reports carry the peers' logs ------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    for name in ("orthanc", "medgru_service"):
        peer = funcargs.get(name)
        if peer is not None and hasattr(peer, "log_tail"):
            report.sections.append((f"{name} log (tail)", peer.log_tail(15_000)))
