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
    models: "ServiceModels | None" = None

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
        """The service's own log, then the logs it keeps under ``MEDGRU_HOME/logs`` (the embedded worker's)."""
        parts = [f"== {self.log_path.name}\n{tail(self.log_path, max_chars)}"]
        for extra in sorted((self.home / "logs").glob("*.log")):
            parts.append(f"== {extra.name}\n{tail(extra, max_chars // 2)}")
        return "\n".join(parts)


def _service_env(home: Path, orthanc: OrthancServer, data_root: Path, models: list[Path]) -> dict[str, str]:
    env = env_without_medgru()
    env.update(
        {
            "MEDGRU_HOME": str(home),
            "MEDGRU_MODEL": ",".join(str(m) for m in models),
            "MEDGRU_DATA_ROOT": str(data_root),
            "MEDGRU_AE_TITLE": MEDGRU_AET,
            "MEDGRU_LISTEN_HOST": "127.0.0.1",
            "MEDGRU_LISTEN_PORT": str(MEDGRU_PORT),
            "MEDGRU_DESTINATION": f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
            "MEDGRU_QUIET_PERIOD_S": str(QUIET_PERIOD_S),
            "MEDGRU_ALLOWED_CALLING_AES": f"{ORTHANC_AET},{STORESCU_AET}",
            "MEDGRU_SEND_RETRY_BASE_S": "1",
            "MEDGRU_REJECT_REVISED_RESULTS": "true",  # Orthanc stores the IOCM note (it does not act on it)
            "MEDGRU_DEVICE": "cpu",
            "MEDGRU_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            "TCP_NODELAY": "1",
        }
    )
    return env


# models -----------------------------------------------------------------------------------------------

SPINE_SCOPES = (("MR", "BRAIN"), ("DX", "CHEST"), ("CR", "CHEST"))
TINY_TRAIN_IMAGES = 16


@dataclass
class ServiceModels:
    paths: list[Path]
    kind: str
    names: list[str]


def _train_tiny_models(folder: Path, data_root: Path) -> list[str]:
    """Two ``knn-effnet`` models with ``SMALL_PARAMS``, fitted on real normal images through the Detector API.

    ``spine-brain``: MR BRAIN/HEAD, from ``brain_mri/train/notumor``; ``spine-chest``: DX/CR CHEST, from
    ``kermany_cxr/train/NORMAL``. Small and quick (seconds on a CPU): the spine test checks the plumbing, not
    the model's accuracy.
    """
    import cv2
    import numpy as np

    from inference.api import FrameSequence, ModelCard, Scope, get_detector_class, sha256_file

    specs = [
        ("spine-brain", "brain_mri/train/notumor", "*.jpg", ("MR",), ("BRAIN", "HEAD"), "MR"),
        ("spine-chest", "kermany_cxr/train/NORMAL", "*.jpeg", ("DX", "CR"), ("CHEST",), "DX"),
    ]
    names = []
    for name, rel, pattern, modalities, body_parts, modality in specs:
        files = sorted((data_root / rel).glob(pattern))[:TINY_TRAIN_IMAGES]
        assert len(files) == TINY_TRAIN_IMAGES, f"{data_root / rel} lacks {TINY_TRAIN_IMAGES} training images"
        normals = []
        for f in files:
            img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
            assert img is not None, f"cannot read {f}"
            normals.append(
                FrameSequence(
                    frames=(img.astype(np.float32) / 255.0)[None],
                    modality=modality,
                    body_part=body_parts[0],
                    bits_stored=8,
                )
            )
        cls = get_detector_class("knn-effnet")
        det = cls(**{**cls.SMALL_PARAMS, "name": name, "version": "0.0.1"})
        det.fit(normals[:12], validation=normals[12:], seed=0)
        model_dir = folder / name
        model_dir.mkdir()
        saved = det.save(model_dir)
        ModelCard(
            name=name,
            version="0.0.1",
            detector="knn-effnet",
            scope=Scope(modalities=modalities, body_parts=body_parts, description=f"spine test: {rel}"),
            params=det.get_params(),
            files={n: sha256_file(model_dir / n) for n in saved},
            training_data=f"{TINY_TRAIN_IMAGES} images of {rel} (integration-test fixture)",
        ).write(model_dir)
        names.append(f"{name} 0.0.1")
    return names


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
def service_models(data_root: Path, tmp_path_factory) -> ServiceModels:
    """The model folders ``medgru serve`` gets (``MEDGRU_MODEL``).

    The bundled models when they cover every scope the spine test sends (MR BRAIN, DX CHEST, CR CHEST);
    otherwise two tiny but genuinely trained ``knn-effnet`` models (see :func:`_train_tiny_models`).
    ``MEDGRU_TEST_SPINE_MODELS=bundled`` or ``=tiny`` forces the choice.
    """
    from inference.api import ModelCard, discover_model_dirs
    from medgru.settings import BUNDLED_MODELS_DIR

    choice = os.environ.get("MEDGRU_TEST_SPINE_MODELS", "auto")
    assert choice in ("auto", "bundled", "tiny"), f"MEDGRU_TEST_SPINE_MODELS={choice!r}: use auto, bundled or tiny"
    cards = [(d, ModelCard.read(d)) for d in discover_model_dirs([BUNDLED_MODELS_DIR])]
    uncovered = [f"{m} {b}" for m, b in SPINE_SCOPES if not any(c.scope.covers(m, b) for _, c in cards)]
    if choice == "bundled" or (choice == "auto" and not uncovered):
        assert not uncovered, f"the bundled models do not cover {uncovered} (found {[c.name for _, c in cards]})"
        return ServiceModels([BUNDLED_MODELS_DIR], "bundled", [f"{c.name} {c.version}" for _, c in cards])
    folder = tmp_path_factory.mktemp("spine-models")
    names = _train_tiny_models(folder, data_root)
    return ServiceModels([folder], f"tiny knn-effnet (bundled models do not cover {uncovered})", names)


@pytest.fixture(scope="session")
def medgru_service(
    netns: NetNamespace, orthanc: OrthancServer, data_root: Path, service_models: ServiceModels, tmp_path_factory
):
    """``medgru serve`` in the namespace; ready once a C-ECHO from STORESCU succeeds."""
    workdir = tmp_path_factory.mktemp("medgru")
    home = workdir / "home"
    print(f"\nmedgru serve uses models: {service_models.kind}: {service_models.names}")
    service = MedgruService(
        netns,
        home,
        _service_env(home, orthanc, data_root, service_models.paths),
        log_path=workdir / "serve.log",
        models=service_models,
    )
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
