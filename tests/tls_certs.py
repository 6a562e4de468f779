"""Test certificates made with the real openssl CLI: a CA, certificates it signs (for 127.0.0.1 and
localhost) and one self-signed certificate that nobody trusts."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = Path("/usr/bin/openssl")


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate (PEM): what each side trusts
    medgru: Pair  # ours: listener and sender
    peer: Pair  # a PACS / modality signed by the CA
    stranger: Pair  # self-signed: trusted by nobody


def _run(*args: str) -> None:
    assert OPENSSL.is_file(), "openssl is required"
    subprocess.run([str(OPENSSL), *args], check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca = folder / "ca.key", folder / "ca.pem"
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=medgru test CA",
         "-keyout", str(ca_key), "-out", str(ca))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n")

    def signed(name: str) -> Pair:
        key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
        _run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
        _run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-days", "2", "-extfile", str(ext), "-out", str(cert))
        return Pair(cert, key)

    stranger = Pair(folder / "stranger.pem", folder / "stranger.key")
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=stranger",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(stranger.key), "-out", str(stranger.cert))
    return Pki(ca=ca, medgru=signed("medgru"), peer=signed("peer"), stranger=stranger)
