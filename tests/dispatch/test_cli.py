"""``medgru outbox list/resend`` through the real command line, against a real SCP that refuses and then
accepts, and the service's own sender."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pydicom
from sqlalchemy import select

from dispatch.sender import STATUS_ERROR_DATASET_MISMATCH, STATUS_SUCCESS, Sender
from medgru.cli import main
from storage.db import init_db, make_session_factory
from storage.models import OutboxItem, OutboxState
from tests.dispatch.conftest import PACS_AET, enqueue_objects

T0 = datetime(2031, 1, 1, 12, 0, tzinfo=timezone.utc)  # a logical clock, later than any row's default


def _states(sf) -> dict[int, tuple[OutboxState, int]]:
    with sf() as s:
        return {i.id: (i.state, i.attempts) for i in s.scalars(select(OutboxItem))}


def test_outbox_list_and_resend(make_settings, failing_scp, result_objects, cli_env, capsys):
    port, status = failing_scp
    settings = make_settings(destination=f"{PACS_AET}@127.0.0.1:{port}")
    cli_env.setenv("MEDGRU_HOME", str(settings.home))
    sf = make_session_factory(init_db(settings.effective_database_url))
    sr_id, sc_id = enqueue_objects(settings, sf, result_objects)
    paths = [settings.outbox_dir / f"{ds.SOPInstanceUID}.dcm" for ds in result_objects]
    sender = Sender(settings, sf, max_attempts=1, timeout=10)
    assert sender.run_once(now=T0) == 0  # the PACS refuses both: FAILED, kept for an admin
    assert _states(sf) == {sr_id: (OutboxState.FAILED, 1), sc_id: (OutboxState.FAILED, 1)}

    capsys.readouterr()
    assert main(["outbox", "list", "--state", "failed"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATE", "OBJECT"]
    rows = {ln.split()[0]: ln for ln in lines[2:]}
    assert set(rows) == {str(sr_id), str(sc_id)}
    assert "Comprehensive 3D SR" in rows[str(sr_id)] and "Secondary Capture Image" in rows[str(sc_id)]
    assert f"0x{STATUS_ERROR_DATASET_MISMATCH:04X}" in rows[str(sr_id)]
    assert str(result_objects[0].SOPInstanceUID) in rows[str(sr_id)]
    assert str(pydicom.dcmread(paths[0]).PatientName) not in out

    assert main(["outbox", "list", "--state", "sent"]) == 0
    assert "(no outbox items)" in capsys.readouterr().out

    # one id that exists and one that does not: the first goes back, the second is named, exit 1
    assert main(["outbox", "resend", str(sr_id), "999"]) == 1
    out = capsys.readouterr().out
    assert "cannot resend: no outbox item 999" in out and f"back to pending: {sr_id}" in out
    assert _states(sf) == {sr_id: (OutboxState.PENDING, 0), sc_id: (OutboxState.FAILED, 1)}
    assert main(["outbox", "resend", "--all-failed"]) == 0
    assert "1 failed item(s) back to pending" in capsys.readouterr().out

    status[0] = STATUS_SUCCESS  # the PACS is fixed: the running sender delivers both
    assert sender.run_once(now=T0 + timedelta(days=1)) == 2
    assert {s for s, _ in _states(sf).values()} == {OutboxState.SENT}
    assert main(["outbox", "resend", str(sc_id)]) == 1
    assert f"outbox item {sc_id} is sent; only failed items can be re-sent" in capsys.readouterr().out
