"""The listener over TLS against DCMTK's storescu: a peer with a certificate the CA signed stores, a
plain-TCP peer and a peer with an untrusted certificate store nothing."""

from __future__ import annotations

import socket

import pytest
from pydicom import dcmwrite

from tests.tls_certs import make_pki

from .conftest import STORESCU, make_mr, run_dcmtk
from .test_scp import instance_row

pytestmark = pytest.mark.integration  # storescu and openssl are real peers


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _storescu(port: int, path, *tls: str):
    return run_dcmtk([STORESCU, "-v", "-nh", *tls, "-aet", "MODALITY", "-aec", "MEDGRU", "127.0.0.1", str(port),
                      str(path)])


def test_listener_over_tls_stores_only_from_trusted_peers(listener_factory, sqlite_session_factory, pki, tmp_path,
                                                          caplog):
    listener = listener_factory(listen_tls=True, tls_certificate=pki.medgru.cert, tls_private_key=pki.medgru.key,
                                tls_trusted_certificates=pki.ca)
    sent = {}
    for name in ("trusted", "plain", "stranger", "anonymous", "after"):
        ds = make_mr()
        dcmwrite(tmp_path / f"{name}.dcm", ds, enforce_file_format=True)
        sent[name] = ds.SOPInstanceUID

    ok = _storescu(listener.port, tmp_path / "trusted.dcm", "+tls", str(pki.peer.key), str(pki.peer.cert),
                   "+cf", str(pki.ca))
    assert ok.returncode == 0 and "Received Store Response (Success)" in ok.stderr, ok.stderr
    assert instance_row(sqlite_session_factory, sent["trusted"]) is not None

    plain = _storescu(listener.port, tmp_path / "plain.dcm")
    stranger = _storescu(listener.port, tmp_path / "stranger.dcm", "+tls", str(pki.stranger.key),
                         str(pki.stranger.cert), "+cf", str(pki.ca))
    anonymous = _storescu(listener.port, tmp_path / "anonymous.dcm", "+tla", "+cf", str(pki.ca))
    for name, res in (("plain", plain), ("stranger", stranger), ("anonymous", anonymous)):
        assert "Received Store Response" not in res.stderr, (name, res.stderr)
        assert instance_row(sqlite_session_factory, sent[name]) is None, name
    # Each storescu above has exited, and the server read (and logged) each refused handshake before the
    # client's exit ended it. The client of a TLS 1.3 handshake without a certificate can exit before the
    # server has read its empty Certificate message: its refusal is logged once that read ends.
    after = _storescu(listener.port, tmp_path / "after.dcm", "+tls", str(pki.peer.key), str(pki.peer.cert),
                      "+cf", str(pki.ca))
    assert "Received Store Response (Success)" in after.stderr, after.stderr
    refusals = [r.getMessage() for r in caplog.records if "TLS handshake with 127.0.0.1" in r.getMessage()]
    assert len(refusals) >= 3, refusals  # each refused peer is named in the log

    # and the listener itself must be trusted: a peer that trusts another CA does not associate
    distrust = _storescu(listener.port, tmp_path / "stranger.dcm", "+tls", str(pki.peer.key), str(pki.peer.cert),
                         "+cf", str(pki.stranger.cert))
    assert "Received Store Response" not in distrust.stderr


def test_a_silent_connection_does_not_stop_the_tls_listener(listener_factory, sqlite_session_factory, pki, tmp_path):
    """A peer that connects and sends nothing (a port check, a stalled client) must not hold up the others:
    the handshake used to run in the server's accepting thread with no time-out, so no other association
    was accepted while that connection stayed open (storescu below never got its handshake answered)."""
    listener = listener_factory(listen_tls=True, tls_certificate=pki.medgru.cert, tls_private_key=pki.medgru.key,
                                tls_trusted_certificates=pki.ca)
    ds = make_mr()
    dcmwrite(tmp_path / "while-silent.dcm", ds, enforce_file_format=True)
    silent = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(2)]
    try:
        res = _storescu(listener.port, tmp_path / "while-silent.dcm", "+tls", str(pki.peer.key),
                        str(pki.peer.cert), "+cf", str(pki.ca))
        assert "Received Store Response (Success)" in res.stderr, res.stderr
        assert instance_row(sqlite_session_factory, ds.SOPInstanceUID) is not None
    finally:
        for sock in silent:
            sock.close()


def test_stopping_the_tls_listener_ends_a_handshake_under_way(make_settings, sqlite_session_factory, pki, tmp_path,
                                                              monkeypatch):
    """The handshake runs in the connection's thread, and the server's close waits for those threads: a
    silent peer held the listener's stop (``medgru serve``'s) for the whole handshake time-out (29.5 s,
    seen with one idle TCP connection open). Its handshake is now ended when the listener stops."""
    import threading

    from pacs_listener.scp import Listener

    build_ae = Listener._build_ae

    def slow_handshakes(self):
        ae = build_ae(self)
        ae.acse_timeout = 3600  # the handshake's time-out: far longer than this test waits
        return ae

    monkeypatch.setattr(Listener, "_build_ae", slow_handshakes)
    listener = Listener(make_settings(listen_host="127.0.0.1", listen_port=0, listen_tls=True,
                                      tls_certificate=pki.medgru.cert, tls_private_key=pki.medgru.key,
                                      tls_trusted_certificates=pki.ca), sqlite_session_factory)
    listener.start()
    stopper = threading.Thread(target=listener.stop, daemon=True)
    ds = make_mr()
    dcmwrite(tmp_path / "after-silent.dcm", ds, enforce_file_format=True)
    with socket.create_connection(("127.0.0.1", listener.port)) as silent:
        try:  # accepted after the silent connection: that one's handshake is under way in its thread
            res = _storescu(listener.port, tmp_path / "after-silent.dcm", "+tls", str(pki.peer.key),
                            str(pki.peer.cert), "+cf", str(pki.ca))
            assert "Received Store Response (Success)" in res.stderr, res.stderr
        finally:
            stopper.start()
        silent.settimeout(120)
        assert silent.recv(1) == b"", "the listener's stop did not end the handshake"
    stopper.join(120)
    assert not stopper.is_alive() and not listener.listening
