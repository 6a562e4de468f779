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


def test_log_messages_carry_no_control_characters(caplog):
    """A series' body part of ``ESC[2J`` or a terminal hyperlink (``ESC]8;;URL BEL``) from a modality reached
    the logs as it was (``job 2 not processed: no model covers ... body part ESC[31mRED``), and acted on the
    terminal of the admin who read them. Every message's control characters are written as ``\\xNN``."""
    install()
    install()
    caplog.set_level("INFO", logger="medgru.test")
    log = logging.getLogger("medgru.test")
    log.info("no model covers body part %s", "\x1b]8;;http://evil.example/\x07CLICK\x1b]8;;\x07")
    log.info("plain \x1b[2J message\rover %d\nsecond line\tok", 1)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["no model covers body part \\x1b]8;;http://evil.example/\\x07CLICK\\x1b]8;;\\x07",
                        "plain \\x1b[2J message\\x0dover 1\nsecond line\tok"]
    assert "\x1b" not in caplog.text and "\x07" not in caplog.text


def test_a_log_call_with_a_bad_format_does_not_raise_into_its_caller(caplog):
    """The escaping record factory formats each message when the record is made: a missing ``%(key)s``
    (KeyError) or an argument whose str() raises escaped from the log call and failed the code that logged,
    where logging only reports a bad record ("--- Logging error ---") and goes on."""
    install()

    class Unprintable:
        def __str__(self):
            raise RuntimeError("no text")

    log = logging.getLogger("medgru.test")
    caplog.set_level("INFO", logger="medgru.test")
    logging.raiseExceptions, before = False, logging.raiseExceptions  # the handler's report is not this test's
    try:
        log.info("%(study)s", {"series": "1.2.3"})
        log.info("value %s", Unprintable())
    finally:
        logging.raiseExceptions = before
    assert len(caplog.records) == 2


def test_a_traceback_logged_carries_no_control_characters(caplog):
    """The exception's message (the last line of the traceback) comes from outside too: a body part of
    ``ESC[31m`` in a ValueError reached the log as it was under log.exception."""
    install()
    caplog.set_level("INFO", logger="medgru.test")
    try:
        raise ValueError("no model covers body part \x1b[31mRED")
    except ValueError:
        logging.getLogger("medgru.test").exception("job 2 failed")
    assert "\x1b" not in caplog.text
    assert "ValueError: no model covers body part \\x1b[31mRED" in caplog.text
    assert "Traceback (most recent call last):" in caplog.text  # the traceback is kept, escaped


def test_a_value_logged_cannot_write_a_line_of_its_own(caplog):
    """Newlines were kept in every message, so a value from outside with one (a PACS's error comment, a
    refusal reason, an exception's text) wrote a second line into the log that looked like the service's
    own. The message's own newlines (its format string) stay; those of its arguments are escaped."""
    install()
    caplog.set_level("INFO", logger="medgru.test")
    log = logging.getLogger("medgru.test")
    forged = "x\n2026-12-08 01:00:00 INFO medgru.worker: job 7 succeeded\r"
    log.warning("PACS refused the SR: %s (%d tries)", forged, 3)
    log.warning("study %(study)s refused: %(why)s", {"study": "1.2.3", "why": forged})
    log.error(ValueError(forged))
    log.info("two lines\nof our own: %s", "ok\tdone")
    messages = [r.getMessage() for r in caplog.records]
    escaped = "x\\x0a2026-12-08 01:00:00 INFO medgru.worker: job 7 succeeded\\x0d"
    assert messages == [f"PACS refused the SR: {escaped} (3 tries)", f"study 1.2.3 refused: {escaped}",
                        escaped, "two lines\nof our own: ok\\x09done"]
    assert all("\n2026" not in m for m in messages)


def test_an_exception_message_logged_cannot_write_a_line_of_its_own(caplog):
    """log.exception kept the newlines of the exception's message (the traceback's last line, a value from
    outside): a message with one wrote a line into the log that looked like the service's own. The
    traceback's own lines stay; the message's newlines are escaped, in a chained exception too."""
    install()
    caplog.set_level("INFO", logger="medgru.test")
    forged = "bad value\n2026-12-08 01:00:00 INFO medgru.worker: job 7 succeeded"
    try:
        try:
            raise OSError("first\nforged")
        except OSError as exc:
            error = ValueError(forged)
            error.add_note("a note\nforged too")  # printed after the message: escaped as well
            raise error from exc
    except ValueError:
        logging.getLogger("medgru.test").exception("job 2 failed")
    text = caplog.records[-1].exc_text
    assert "ValueError: bad value\\x0a2026-12-08 01:00:00 INFO" in text
    assert "\n2026-12-08" not in text and "first\\x0aforged" in text
    assert text.startswith("Traceback (most recent call last):\n")  # the traceback keeps its lines
    assert "The above exception was the direct cause" in text
    assert "a note\\x0aforged too" in text
