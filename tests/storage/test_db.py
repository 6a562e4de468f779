"""storage/db.py: how the service's loops log a database outage."""

from __future__ import annotations

import logging

from sqlalchemy.exc import OperationalError

import storage.db as db
from storage.db import PassLog, database_unreachable


def _refused() -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception('connection to server at "127.0.0.1", port 5440 failed: '
                                                      "Connection refused\n\tIs the server running?"))


def test_an_outage_is_a_line_when_it_begins_a_reminder_a_minute_and_a_line_when_it_ends(caplog, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(db.time, "monotonic", lambda: clock[0])
    passes = PassLog(logging.getLogger("t.loop"), "sender pass")
    with caplog.at_level(logging.INFO, logger="t.loop"):
        for _ in range(240):  # two minutes of passes every half second
            passes.failed(_refused(), 0.5)
            clock[0] += 0.5
        passes.succeeded()
        passes.succeeded()
    messages = [r.getMessage() for r in caplog.records]
    assert all(r.exc_info is None for r in caplog.records)
    assert messages[0] == ('sender pass failed: the database does not answer (connection to server at "127.0.0.1", '
                           "port 5440 failed: Connection refused); retrying every 0.5 s")
    assert messages[1].split(" (")[0] == "sender pass: the database has not answered for 60 s"
    # the second reminder falls due at 120 s, the last pass at 119.5 s; then one line when it answers
    assert len(messages) == 3 and messages[2] == "sender pass: the database answers again after 120 s"


def test_another_error_keeps_its_traceback(caplog):
    passes = PassLog(logging.getLogger("t.loop"), "assembly pass")
    with caplog.at_level(logging.ERROR, logger="t.loop"):
        passes.failed(KeyError("bug"), 1.0)
        passes.failed(KeyError("bug"), 1.0)
    assert [type(r.exc_info[1]) for r in caplog.records] == [KeyError, KeyError]
    assert database_unreachable(_refused()) and not database_unreachable(KeyError("bug"))


def test_an_outage_with_an_empty_reason_is_logged_too(caplog):
    """A driver error with no text (str() empty) made ``"".splitlines()[0]`` raise IndexError inside the
    loop's except clause: the sweeper's, assembler's, sender's or retention's thread ended for good."""
    passes = PassLog(logging.getLogger("t.loop"), "retention pass")
    with caplog.at_level(logging.ERROR, logger="t.loop"):
        passes.failed(OperationalError("SELECT 1", {}, Exception("")), 1.0)
    [record] = caplog.records
    assert record.getMessage().startswith("retention pass failed: the database does not answer (")


def test_a_database_a_newer_release_migrated_is_refused_with_the_way_back(tmp_path):
    """An admin going back to the older release after an upgrade got Alembic's traceback, "Can't locate revision
    identified by '0010'", from `medgru serve` and every admin command: nothing said that a newer release had
    migrated the database or how to go back (found going back from this release to 9230aa7)."""
    import pytest
    from sqlalchemy import text

    from storage.db import SchemaNewerThanRelease, head_revision, init_db

    url = f"sqlite:///{tmp_path / 'medgru.sqlite3'}"
    engine = init_db(url)
    with engine.begin() as conn:  # what a later release's migration leaves
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    with pytest.raises(SchemaNewerThanRelease) as refused:
        init_db(url)
    message = str(refused.value)
    assert "revision 0099" in message and f"`medgru db downgrade {head_revision()}`" in message
