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


def server_context(settings) -> ssl.SSLContext | None:
    """The listener's TLS context, or ``None`` for plain TCP."""
    if not settings.listen_tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.tls_certificate), str(settings.tls_private_key))
    ctx.load_verify_locations(cafile=str(settings.tls_trusted_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(settings) -> ssl.SSLContext | None:
    """The sender's TLS context, or ``None`` for plain TCP."""
    if not settings.send_tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(settings.tls_trusted_certificates))
    ctx.check_hostname = bool(settings.tls_verify_hostname)
    if settings.tls_certificate and settings.tls_private_key:
        ctx.load_cert_chain(str(settings.tls_certificate), str(settings.tls_private_key))
    return ctx


def dashboard_context(settings) -> ssl.SSLContext | None:
    """The dashboard's HTTPS context (our certificate; browsers need no client certificate), or ``None``."""
    if not settings.dashboard_https:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.tls_certificate), str(settings.tls_private_key))
    return ctx
