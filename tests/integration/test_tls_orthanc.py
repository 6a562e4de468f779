"""The spine over DICOM TLS with a real Orthanc: Orthanc sends a chest radiograph to ``medgru serve`` over
TLS and gets the SR and the overlay back over TLS, each side checking the other's certificate.

A second Orthanc and a second service run beside the plain-TCP pair of ``test_spine.py`` in the same
network namespace, on their own ports. Certificates come from the openssl CLI (``tests/tls_certs.py``)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import REPO_ROOT, MedgruService, _service_env
from tests.integration.netns import NetNamespace, stop_process
from tests.integration.orthanc import Modality, OrthancError, OrthancServer
from tests.integration.test_spine import CHEST_SERIES, RESULT_TIMEOUT_S, ResultFinder, _files, _header, _wait_for
from tests.tls_certs import make_pki

pytestmark = pytest.mark.integration

TLS_AET, TLS_PORT = "MEDGRUTLS", 11113
PACS_AET, PACS_DICOM_PORT, PACS_HTTP_PORT = "ORTHANCTLS", 4244, 8044


def test_orthanc_and_medgru_over_tls(netns: NetNamespace, data_root: Path, service_models, dicom_corpus: Path,
                                     tmp_path: Path):
    pki = make_pki(tmp_path / "pki")
    orthanc = OrthancServer(
        netns, tmp_path / "orthanc", aet=PACS_AET, http_port=PACS_HTTP_PORT, dicom_port=PACS_DICOM_PORT,
        load_dicomweb=False,
        modalities={"medgru": Modality(TLS_AET, "127.0.0.1", TLS_PORT, tls=True)},
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.peer.cert),
            "DicomTlsPrivateKey": str(pki.peer.key),
            "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    (tmp_path / "orthanc").mkdir()
    orthanc.start()
    home = tmp_path / "medgru-home"
    env = _service_env(home, orthanc, data_root, service_models.paths)
    env.update({
        "MEDGRU_AE_TITLE": TLS_AET, "MEDGRU_LISTEN_PORT": str(TLS_PORT), "MEDGRU_ALLOWED_CALLING_AES": PACS_AET,
        "MEDGRU_DESTINATION": f"{PACS_AET}@127.0.0.1:{PACS_DICOM_PORT}", "MEDGRU_DASHBOARD_PORT": "0",
        "MEDGRU_LISTEN_TLS": "true", "MEDGRU_SEND_TLS": "true",
        "MEDGRU_TLS_CERTIFICATE": str(pki.medgru.cert), "MEDGRU_TLS_PRIVATE_KEY": str(pki.medgru.key),
        "MEDGRU_TLS_TRUSTED_CERTIFICATES": str(pki.ca),
    })
    service = MedgruService(netns, home, env, ae_title=TLS_AET, port=TLS_PORT, log_path=tmp_path / "serve.log")
    with open(service.log_path, "ab") as log:
        service.process = netns.popen([sys.executable, "-m", "medgru.cli", "serve"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 180
        while True:  # ready once Orthanc's C-ECHO reaches us over TLS
            assert service.process.poll() is None, f"medgru serve exited\n{service.log_tail()}"
            try:
                orthanc.echo("medgru")
                break
            except OrthancError:
                assert time.monotonic() < deadline, f"no TLS C-ECHO within 180 s\n{service.log_tail()}"
                time.sleep(1.0)

        files = _files(dicom_corpus, CHEST_SERIES)
        head = _header(files[0])
        [answer] = orthanc.upload_files(files)
        orthanc.store_to_modality("medgru", [answer["ParentSeries"]])
        finder = ResultFinder(orthanc)

        def both():
            found = finder.results(head.StudyInstanceUID, head.SeriesInstanceUID)
            return found if found["SR"] and found["SC"] else None

        _wait_for("the SR and SC over TLS", both, RESULT_TIMEOUT_S,
                  lambda: f"{service.log_tail()}\n{orthanc.log_tail()}")
        log_text = service.log_path.read_text(errors="replace")
        assert "over TLS, peer certificates required" in log_text and "TLS handshake" not in log_text

        # the admin's pre-flight check against the same Orthanc, over TLS: echo and both result classes
        echo = netns.run([sys.executable, "-m", "medgru.cli", "echo"], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert f"{PACS_AET}@127.0.0.1:{PACS_DICOM_PORT} (calling AE {TLS_AET}, TLS on)" in echo.stdout
        assert "C-ECHO: success (0x0000)" in echo.stdout
        assert "Comprehensive 3D SR Storage: accepted" in echo.stdout
        assert "Secondary Capture Image Storage: accepted" in echo.stdout
    finally:
        stop_process(service.process, grace_s=30.0)
        orthanc.stop()
