"""medgru.logsafe: pydicom's records quote no values and name the instance being read."""

from __future__ import annotations

import logging

from medgru.logsafe import install, instance_context, redact


def test_redact_replaces_every_quoted_value():
    assert redact("Invalid value for VR PN: 'Zorglub^Quetzal'.") == "Invalid value for VR PN: '…'."
    assert redact('a "19xx0101" and \'12 years\' and none') == "a '…' and '…' and none"
    assert redact("The value length (65) exceeds 64") == "The value length (65) exceeds 64"


def test_records_name_the_innermost_instance_and_restore_the_outer(caplog):
    install()
    install()  # idempotent: one filter
    log = logging.getLogger("pydicom")
    assert sum(type(f).__name__ == "PydicomRecordFilter" for f in log.filters) == 1
    caplog.set_level("WARNING", logger="pydicom")
    with instance_context("1.2.3"):
        log.warning("Invalid value for VR DA: %r.", "19xx0101")
        with instance_context("1.2.4"):
            log.warning("inner")
        log.warning("outer again")
    log.warning("outside")
    assert [r.getMessage() for r in caplog.records] == [
        "SOP Instance 1.2.3: Invalid value for VR DA: '…'.", "SOP Instance 1.2.4: inner",
        "SOP Instance 1.2.3: outer again", "outside"]
