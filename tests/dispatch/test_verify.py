"""``medgru echo``: a C-ECHO and the result SOP classes, against a real DCMTK storescp and real pynetdicom
peers that accept less, refuse our AE title or are not there."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from dispatch.verify import RESULT_SOP_CLASSES, verify_destination
from medgru.cli import main
from medgru.settings import Destination
from tests.dispatch.conftest import PACS_AET, free_port


def test_result_classes_are_what_reporting_builds(result_objects):
    assert {str(ds.SOPClassUID) for ds in result_objects} == {str(uid) for uid in RESULT_SOP_CLASSES}


def test_echo_storescp_through_the_command_line(make_settings, storescp, cli_env, capsys):
    storescp.start()
    cli_env.setenv("MEDGRU_HOME", str(make_settings().home))
    cli_env.setenv("MEDGRU_AE_TITLE", "MEDGRU_TEST")
    cli_env.setenv("MEDGRU_DESTINATION", f"{PACS_AET}@127.0.0.1:{storescp.port}")
    assert main(["echo"]) == 0
    out = capsys.readouterr().out
    assert f"[destination] {PACS_AET}@127.0.0.1:{storescp.port} (calling AE MEDGRU_TEST, TLS off)" in out
    assert "C-ECHO: success (0x0000) in " in out
    assert "Comprehensive 3D SR Storage: accepted (Explicit VR Little Endian)" in out
    assert "Secondary Capture Image Storage: accepted (Explicit VR Little Endian)" in out
    assert out.rstrip().endswith("OK: results can be sent")
    assert "Received Echo Request" in storescp.log_path.read_text(errors="replace")  # the peer saw the echo

    storescp.stop()  # the same check with the PACS down: named, exit 1
    assert main(["echo", "--timeout", "3"]) == 1
    out = capsys.readouterr().out
    assert "FAILED:" in out and "unreachable" in out and "C-ECHO" not in out


@pytest.fixture
def partial_scp() -> Iterator[tuple[int, AE]]:
    """A pynetdicom peer answering C-ECHO and taking Secondary Capture, but no SR."""
    ae = AE(ae_title=PACS_AET)
    ae.add_supported_context(Verification)
    ae.add_supported_context(SecondaryCaptureImageStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        yield port, ae
    finally:
        server.shutdown()


def test_a_peer_that_refuses_the_sr_class_fails_the_check(partial_scp, make_settings, cli_env, capsys):
    port, _ = partial_scp
    cli_env.setenv("MEDGRU_HOME", str(make_settings().home))
    assert main(["echo", f"{PACS_AET}@127.0.0.1:{port}"]) == 1
    out = capsys.readouterr().out
    assert "C-ECHO: success (0x0000)" in out  # an echo alone would have said all is well
    assert "Comprehensive 3D SR Storage: NOT accepted" in out
    assert "Secondary Capture Image Storage: accepted" in out
    assert "FAILED:" in out and "Comprehensive 3D SR Storage" in out.splitlines()[-1]


def test_with_rejection_notes_on_the_check_asks_for_their_class_too(make_settings, cli_env, capsys):
    # a PACS that refuses Key Object Selection would fail every rejection note; the check says so first
    cli_env.setenv("MEDGRU_HOME", str(make_settings().home))
    for classes, off, on in (((), 0, 1), ((KeyObjectSelectionDocumentStorage,), 0, 0)):
        ae = AE(ae_title=PACS_AET)
        for uid in (Verification, Comprehensive3DSRStorage, SecondaryCaptureImageStorage, *classes):
            ae.add_supported_context(uid)
        port = free_port()
        server = ae.start_server(("127.0.0.1", port), block=False)
        try:
            cli_env.delenv("MEDGRU_REJECT_REVISED_RESULTS", raising=False)
            assert main(["echo", f"{PACS_AET}@127.0.0.1:{port}"]) == off  # the default: SR and SC suffice
            assert "Key Object Selection" not in capsys.readouterr().out
            cli_env.setenv("MEDGRU_REJECT_REVISED_RESULTS", "true")
            assert main(["echo", f"{PACS_AET}@127.0.0.1:{port}"]) == on
            out = capsys.readouterr().out
            if on:
                assert "Key Object Selection Document Storage: NOT accepted" in out
                assert "Key Object Selection Document Storage" in out.splitlines()[-1]
            else:
                assert "Key Object Selection Document Storage: accepted" in out
        finally:
            server.shutdown()


def test_a_peer_that_does_not_know_our_ae_title(partial_scp):
    port, ae = partial_scp
    ae.require_calling_aet = ["SOMEONE_ELSE"]
    report = verify_destination(Destination.parse(f"{PACS_AET}@127.0.0.1:{port}"), calling_ae="MEDGRU", timeout=5)
    assert not report.ok and not report.echoed
    assert report.error.startswith(f"association rejected by {PACS_AET}@127.0.0.1:{port}")
    assert "calling AE MEDGRU" in report.error


def test_no_destination_and_a_malformed_one(make_settings, cli_env, capsys):
    cli_env.setenv("MEDGRU_HOME", str(make_settings().home))
    assert main(["echo"]) == 2
    assert "no destination configured" in capsys.readouterr().out
    assert main(["echo", "PACS-at-host"]) == 2
    assert "not of the form AET@host:port" in capsys.readouterr().out


def test_echo_checks_the_destination_and_every_route(partial_scp, storescp, make_settings, cli_env, capsys):
    """One report per configured peer, each named by what sends there; exit 1 when any of them fails."""
    port, _ = partial_scp
    storescp.start()
    cli_env.setenv("MEDGRU_HOME", str(make_settings().home))
    cli_env.setenv("MEDGRU_DESTINATION", f"{PACS_AET}@127.0.0.1:{storescp.port}")
    cli_env.setenv("MEDGRU_ROUTES", f"SITE_A={PACS_AET}@127.0.0.1:{storescp.port},SITE_B={PACS_AET}@127.0.0.1:{port}")
    assert main(["echo"]) == 1
    reports = capsys.readouterr().out.split("\n\n")
    assert len(reports) == 2
    assert reports[0].startswith(f"[destination, route of SITE_A] {PACS_AET}@127.0.0.1:{storescp.port}")
    assert reports[0].rstrip().endswith("OK: results can be sent")
    assert reports[1].startswith(f"[route of SITE_B] {PACS_AET}@127.0.0.1:{port}")
    assert "Comprehensive 3D SR Storage: NOT accepted" in reports[1]


def test_an_unresolvable_pacs_host_is_a_failed_check_not_a_crash(capsys):
    """A typo in the destination's host name: socket.gaierror escaped open_association, ``medgru echo``
    printed a traceback and the dashboard's Check the PACS dropped the connection with no answer."""
    report = verify_destination(Destination(ae_title="PACS", host="pacs.hospital.invalid", port=4242),
                                calling_ae="MEDGRU", timeout=5)
    assert not report.ok and "pacs.hospital.invalid" in report.error, report.error
    assert main(["echo", "PACS@pacs.hospital.invalid:4242"]) == 1
    assert "unreachable" in capsys.readouterr().out
