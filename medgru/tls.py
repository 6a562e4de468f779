"""DICOM over TLS (PS3.15 Annex B, the BCP 195 profile that DCMTK and Orthanc speak).

Off by default. With ``settings.listen_tls`` the listener accepts TLS only, and every peer must present a
certificate signed by one of ``settings.tls_trusted_certificates`` (mutual TLS, as Orthanc requires by
default). With ``settings.send_tls`` results go to the PACS over TLS: its certificate must chain to the
trusted certificates (and name its host, unless ``tls_verify_hostname`` is off), and we present ours.
TLS 1.2 is the floor. ``settings.dashboard_https`` serves the dashboard over HTTPS with the same
certificate, so that its password does not cross the network in clear.
"""

from __future__ import annotations

import ssl


def _context(protocol, certificate=None, private_key=None, trusted=None) -> ssl.SSLContext:
    """A TLS 1.2+ context presenting ``certificate`` (with its key) and trusting ``trusted``, where given."""
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if certificate is not None and private_key is not None:
        ctx.load_cert_chain(str(certificate), str(private_key))
    if trusted is not None:
        ctx.load_verify_locations(cafile=str(trusted))
    return ctx


def server_context(settings) -> ssl.SSLContext | None:
    """The listener's TLS context (peers must present a trusted certificate), or ``None`` for plain TCP."""
    if not settings.listen_tls:
        return None
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, settings.tls_certificate, settings.tls_private_key,
                   settings.tls_trusted_certificates)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(settings) -> ssl.SSLContext | None:
    """The sender's TLS context, or ``None`` for plain TCP."""
    if not settings.send_tls:
        return None
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, settings.tls_certificate, settings.tls_private_key,
                   settings.tls_trusted_certificates)
    ctx.check_hostname = bool(settings.tls_verify_hostname)
    return ctx


def dashboard_context(settings) -> ssl.SSLContext | None:
    """The dashboard's HTTPS context (our certificate; browsers need no client certificate), or ``None``."""
    if not settings.dashboard_https:
        return None
    return _context(ssl.PROTOCOL_TLS_SERVER, settings.tls_certificate, settings.tls_private_key)
