"""pacs_listener/quarantine.py: what ``medgru quarantine show`` and the dashboard read of one refused instance."""

from __future__ import annotations

from datetime import timedelta

from pacs_listener.quarantine import quarantine_detail
from pacs_listener.spool import QuarantineReason, write_quarantine
from storage.db import init_db, make_session_factory
from storage.models import QuarantineItem, utcnow
from storage.retention import prune


def test_a_quarantined_file_removed_by_retention_is_no_unreadable_reason_file(make_settings):
    """Retention removes a quarantined file and its reason file on purpose, and the row keeps the reason; `medgru
    quarantine show` then said 'reason file  unreadable: FileNotFoundError: [Errno 2] No such file or directory'
    as if something had gone wrong (found pruning the rows of an upgraded 9230aa7 installation)."""
    settings = make_settings(quarantine_retention_days=1.0)
    sf = make_session_factory(init_db(settings.effective_database_url))
    received = utcnow() - timedelta(days=3)
    rel = write_quarantine(settings.quarantine_dir, b"not DICOM", QuarantineReason(
        reason="spool write failed", status_code=0xA700, status_text="Out of Resources", calling_ae="SCANNER",
        sop_instance_uid="1.2.3.4", study_uid="1.2.3", series_uid="1.2.3.5", received_at=received.isoformat()))
    with sf() as s:
        item = QuarantineItem(path=rel, reason="spool write failed", sop_instance_uid="1.2.3.4",
                              calling_ae="SCANNER", status_code=0xA700, received_at=received)
        s.add(item)
        s.commit()
        item_id = item.id
    with sf() as s:  # kept: the sidecar's UIDs are read
        detail = quarantine_detail(s, settings.quarantine_dir, item_id)
    assert detail["series_uid"] == "1.2.3.5" and "sidecar_error" not in detail

    report = prune(settings, sf)
    assert report.summary().count("1 quarantined file") == 1
    with sf() as s:
        detail = quarantine_detail(s, settings.quarantine_dir, item_id)
    assert detail["purged_at"] is not None and detail["file_bytes"] is None
    assert detail["reason"] == "spool write failed"
    assert "sidecar_error" not in detail
