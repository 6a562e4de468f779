"""The admin commands' text output (:mod:`medgru.tables`): values from outside cannot drive the terminal."""

from __future__ import annotations

import pytest

from medgru.cli import main
from medgru.tables import format_table, print_fields, printable
from storage.db import init_db, make_session_factory
from storage.models import Job, JobState, Patient, QuarantineItem, SequenceRecord, Series, Study

#: what a modality or a PACS may put in a value we print: a screen clear and red text, a window title, a
#: terminal hyperlink, a one-byte CSI (C1), a bidi override, a carriage return that overwrites the line
HOSTILE = ["\x1b[2J\x1b[31mRED", "\x1b]0;title\x07", "\x1b]8;;http://evil.example/\x07click\x1b]8;;\x07",
           "\x9b2J", "abc\u202edef", "ok\rfailed"]
CONTROLS = ["\x1b", "\x07", "\x9b", "\u202e", "\r"]


def test_printable_escapes_what_a_terminal_would_act_on():
    for value in HOSTILE:
        shown = printable(value)
        assert not any(c in shown for c in CONTROLS), repr(shown)
    assert printable("\x1b[2J") == "\\x1b[2J"
    assert printable("a\nb") == "a\\x0ab"  # a table cell stays on its line
    assert printable("a\nb\tc", lines=True) == "a\nb\tc"
    assert printable("1.2.840.10008 MR BRAIN é") == "1.2.840.10008 MR BRAIN é"
    assert printable(None) == ""


def test_table_and_fields_print_no_control_characters(capsys):
    table = format_table(["A", "B"], [[v, 1] for v in HOSTILE])
    assert not any(c in table for c in CONTROLS)
    assert "\\x1b[2J" in table
    print_fields([(f"k{i}", v) for i, v in enumerate(HOSTILE)])
    out = capsys.readouterr().out
    assert not any(c in out for c in CONTROLS)


@pytest.fixture
def hostile_home(make_settings, cli_env):
    """A home whose database holds a series with escape sequences in its modality and body part (CS values
    from the modality) and a quarantined instance whose reason and calling AE carry them."""
    settings = make_settings()
    sf = make_session_factory(init_db(settings.effective_database_url))
    with sf() as s:
        st = Study(study_uid="1.2.3", patient=Patient(patient_id="P1"))
        se = Series(series_uid="1.2.3.4", study=st, modality="MR\x1b[2J",
                    body_part="\x1b]8;;http://evil.example/\x07CLICK\x1b]8;;\x07")
        seq = SequenceRecord(series=se, frame_refs=[["1.2.3.4.1", 1]], n_frames=1)
        s.add_all([Job(sequence=seq, state=JobState.NOT_PROCESSED,
                       reason="no model covers modality MR\x1b[2J, body part \x1b[31mRED"),
                   QuarantineItem(path="2026-01-01/x.dcm", reason="bad value \x1b[2J\x9b31m",
                                  sop_instance_uid="1.2.3.9", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                                  calling_ae="MOD\x1b[5m", status_code=0xA900)])
        s.commit()
    cli_env.setenv("MEDGRU_HOME", str(settings.home))
    return settings


@pytest.mark.parametrize("argv", [["jobs", "list"], ["jobs", "show", "1"], ["quarantine", "list"],
                                  ["quarantine", "show", "1"]])
def test_admin_commands_print_no_escape_sequences_from_the_data(hostile_home, argv, capsys):
    """``ESC[2J`` in a series' body part cleared the admin's screen in ``medgru jobs list`` and ``ESC]8;;``
    made a link in their terminal: the commands print such values escaped."""
    main(argv)
    out = capsys.readouterr().out
    assert out.strip()
    assert not any(c in out for c in CONTROLS), repr(out)


@pytest.mark.parametrize("command", [["jobs", "list"], ["outbox", "list"], ["quarantine", "list"]])
def test_a_limit_below_one_is_an_error(hostile_home, command, capsys):
    """``--limit 0`` (or -5) listed one row and exited 0, as if only one existed: it is a usage error now."""
    for bad in ("0", "-5", "x"):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--limit", bad])
        assert exit_.value.code == 2
        assert "--limit" in capsys.readouterr().err
    assert main([*command, "--limit", "1"]) == 0


def test_an_admin_command_does_not_migrate_a_database_at_an_older_schema(make_settings, cli_env, capsys):
    """Upgrading in the usual order (install the new release, then restart the service), an admin's `medgru jobs
    list` in between migrated the database (quietly) under the older service still running on it, which then
    went on with its older code on the new schema: its listener recorded instances without their patient
    (instances.patient_fk NULL), so they never get or give a prior study (found upgrading from 9230aa7 on
    SQLite). An admin command now refuses a database at an older revision and says what to do; an empty
    database still gets the schema, and `medgru db upgrade` migrates."""
    from sqlalchemy import create_engine, text

    from storage.db import downgrade_db, head_revision

    settings = make_settings()
    cli_env.setenv("MEDGRU_HOME", str(settings.home))
    assert main(["jobs", "list"]) == 0  # an empty database: the schema is created
    assert "(no jobs)" in capsys.readouterr().out
    downgrade_db(settings.effective_database_url, "0007")  # what the older release left

    for argv in (["jobs", "list"], ["outbox", "list"], ["quarantine", "list"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"schema is at revision 0007, this release's is {head_revision()}" in err
        assert "medgru db upgrade" in err
    engine = create_engine(settings.effective_database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0007"
    finally:
        engine.dispose()
    init_db(settings.effective_database_url).dispose()  # medgru serve's start
    assert main(["outbox", "list"]) == 0
