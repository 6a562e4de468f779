"""Results to a PACS over TLS: DCMTK's storescp with a certificate our CA signed takes them; one with an
untrusted certificate gets nothing, and the outbox says why."""

from __future__ import annotations

from datetime import datetime, timezone

import pydicom
import pytest
from sqlalchemy import select

from dispatch.sender import Sender
from storage.models import OutboxItem, OutboxState
from tests.dispatch.conftest import PACS_AET, enqueue_objects
from tests.tls_certs import make_pki

pytestmark = pytest.mark.integration  # storescp and openssl are real peers

T0 = datetime(2031, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("pacs_cert", ["peer", "stranger"])
def test_sender_over_tls(make_settings, session_factory, storescp, result_objects, pki, pacs_cert):
    pair = getattr(pki, pacs_cert)
    storescp.start("+tls", str(pair.key), str(pair.cert), "+cf", str(pki.ca))
    settings = make_settings(destination=f"{PACS_AET}@127.0.0.1:{storescp.port}", send_tls=True,
                             tls_certificate=pki.medgru.cert, tls_private_key=pki.medgru.key,
                             tls_trusted_certificates=pki.ca)
    enqueue_objects(settings, session_factory, result_objects)
    sent = Sender(settings, session_factory, timeout=10).run_once(now=T0)
    with session_factory() as s:
        items = list(s.scalars(select(OutboxItem).order_by(OutboxItem.id)))
    if pacs_cert == "peer":
        assert sent == 2 and {i.state for i in items} == {OutboxState.SENT}
        got = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in storescp.received()}
        assert got == {str(ds.SOPInstanceUID) for ds in result_objects}
    else:  # kept and retried; the error names the certificate, not a network outage
        assert sent == 0 and {i.state for i in items} == {OutboxState.PENDING}
        assert storescp.received() == []
        assert all("TLS with" in i.last_error and "CERTIFICATE_VERIFY_FAILED" in i.last_error for i in items), \
            [i.last_error for i in items]
