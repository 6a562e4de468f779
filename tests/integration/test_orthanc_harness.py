"""Tests of the integration harness itself: the network namespace, Orthanc in it, the dcmtk tools."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
import requests

from tests.integration.conftest import ORTHANC_AET, STORESCU_AET
from tests.integration.dcmtk import echoscu, storescu
from tests.integration.netns import NetNamespace
from tests.integration.orthanc import OrthancError, OrthancServer

pytestmark = pytest.mark.integration

DX_CHEST = Path("highdicom/dx_image.dcm")
STORE_SERIES = Path("dcm_qa_nih/20180918GE/mr_0004")  # a series no other integration test uses


def _loopback_port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_orthanc_runs_in_the_namespace_loopback_only(netns: NetNamespace, orthanc: OrthancServer):
    system = orthanc.system()
    assert system["DicomAet"] == ORTHANC_AET
    assert system["DicomPort"] == orthanc.dicom_port
    assert orthanc.process is not None and orthanc.process.pid in netns.pids()
    # the generated configuration is the one Orthanc runs with
    cfg = orthanc.config()
    assert cfg["RemoteAccessAllowed"] is False
    assert cfg["DicomAlwaysAllowStore"] is False and cfg["DicomAlwaysAllowEcho"] is False
    assert set(orthanc.modalities_list()) == set(orthanc.modalities)
    # reachable inside the namespace, not from the host's network namespace
    assert netns.call(_loopback_port_open, orthanc.http_port) is True
    try:
        seen_from_host = requests.get(f"{orthanc.url}/system", timeout=5).json().get("Name")
    except (requests.RequestException, ValueError):
        seen_from_host = None
    assert seen_from_host != system["Name"], "the test Orthanc is reachable from the host namespace"
    # the DICOMweb plugin is optional; when loaded it answers
    if orthanc.dicomweb_loaded:
        assert "dicom-web" in orthanc.get("/plugins")


def test_rest_upload_is_listed(orthanc: OrthancServer, dicom_corpus: Path):
    path = dicom_corpus / DX_CHEST
    uid = pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID
    answer = orthanc.upload_file(path)
    assert answer["ParentStudy"] in orthanc.studies()
    series = orthanc.study_series(answer["ParentStudy"])
    assert uid in [s["MainDicomTags"]["SeriesInstanceUID"] for s in series]
    assert orthanc.series_id_for_uid(uid) == answer["ParentSeries"]
    tags = orthanc.instance_tags(answer["ID"])
    assert tags["Modality"] == "DX"
    png = orthanc.instance_preview_png(answer["ID"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert orthanc.instance_file(answer["ID"])[128:132] == b"DICM"


def test_echoscu_allowed_and_unknown_ae(netns: NetNamespace, orthanc: OrthancServer):
    ok = echoscu(netns, orthanc.dicom_port, calling=STORESCU_AET, called=ORTHANC_AET)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    unknown = echoscu(netns, orthanc.dicom_port, calling="INTRUDER", called=ORTHANC_AET)
    assert unknown.returncode != 0, "Orthanc accepted a C-ECHO from an AE title it does not know"
    wrong_called = echoscu(netns, orthanc.dicom_port, calling=STORESCU_AET, called="NOTORTHANC")
    assert wrong_called.returncode != 0, "Orthanc accepted an association with the wrong called AE title"


def test_storescu_allowed_ae_stores_unknown_ae_is_refused(
    netns: NetNamespace, orthanc: OrthancServer, dicom_corpus: Path
):
    files = sorted((dicom_corpus / STORE_SERIES).glob("*.dcm"))[:3]
    assert len(files) == 3
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID

    refused = storescu(netns, orthanc.dicom_port, files, calling="INTRUDER", called=ORTHANC_AET)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert orthanc.series_id_for_uid(uid) is None, "an unknown calling AE managed to store"

    stored = storescu(netns, orthanc.dicom_port, files, calling=STORESCU_AET, called=ORTHANC_AET)
    assert stored.returncode == 0, stored.stdout + stored.stderr
    series_id = orthanc.series_id_for_uid(uid)
    assert series_id is not None
    assert len(orthanc.series_instances(series_id)) == 3


def test_rest_errors_are_raised(orthanc: OrthancServer):
    with pytest.raises(OrthancError, match="404"):
        orthanc.get("/studies/does-not-exist")


def test_namespace_and_orthanc_are_cleaned_up(dicom_corpus: Path):
    """A second, short-lived namespace + Orthanc: after stop and destroy, nothing is left."""
    with tempfile.TemporaryDirectory() as tmp:
        ns = NetNamespace().create()
        try:
            assert ns.exists
            server = OrthancServer(ns, Path(tmp), http_port=8043, dicom_port=4243, load_dicomweb=False)
            server.start()
            pid = server.process.pid
            assert ns.pids() == [pid]
            server.upload_file(dicom_corpus / DX_CHEST)
            assert len(server.studies()) == 1
            assert server.stop() == 0
            assert ns.pids() == []
            # a stray process is killed by destroy()
            stray = ns.popen(["sleep", "300"])
            deadline = time.monotonic() + 10  # `ip netns exec` joins the namespace a moment after fork
            while stray.pid not in ns.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stray.pid in ns.pids()
        finally:
            ns.destroy()
        assert stray.wait(timeout=15) != 0
        assert not ns.exists
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert ns.name not in listed
