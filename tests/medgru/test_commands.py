"""``medgru config``: the effective settings, printed without any secret."""

from __future__ import annotations

import json

from medgru.cli import main


def test_config_hides_the_passwords_of_the_database_and_broker_urls(make_settings, cli_env, capsys):
    cli_env.setenv("MEDGRU_HOME", str(make_settings().home))
    cli_env.setenv("MEDGRU_DATABASE_URL", "postgresql+psycopg://medgru:S3cretDbPw@db.example:5432/medgru")
    cli_env.setenv("MEDGRU_BROKER_URL", "redis://:S3cretRedisPw@redis.example:6379/0")
    cli_env.setenv("MEDGRU_DASHBOARD_PASSWORD", "S3cretDashPw")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "S3cret" not in out
    shown = json.loads(out)
    assert shown["database_url"] == "postgresql+psycopg://medgru:***@db.example:5432/medgru"
    assert shown["broker_url"] == "redis://:***@redis.example:6379/0"
    assert shown["dashboard_password"] == "**********"


def test_config_masks_each_broker_of_a_failover_list_and_keeps_urls_without_a_password(make_settings, cli_env, capsys):
    cli_env.setenv("MEDGRU_HOME", str(make_settings().home))
    cli_env.setenv("MEDGRU_DATABASE_URL", "postgresql+psycopg://medgru@db.example/medgru")
    cli_env.setenv("MEDGRU_BROKER_URL", "amqp://guest:S3cretAmqpPw@mq.example//;redis://cache.example:6379/1")
    assert main(["config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["database_url"] == "postgresql+psycopg://medgru@db.example/medgru"
    assert shown["broker_url"] == "amqp://guest:***@mq.example//;redis://cache.example:6379/1"


def test_a_missing_config_file_stops_the_command_with_exit_2(make_settings, cli_env, capsys, tmp_path):
    cli_env.setenv("MEDGRU_HOME", str(make_settings().home))
    missing = tmp_path / "no-such.toml"
    assert main(["--config", str(missing), "config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed as if the defaults were the configuration
    assert str(missing) in captured.err and "does not exist" in captured.err
    cli_env.setenv("MEDGRU_CONFIG", str(missing))
    assert main(["config"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_an_invalid_setting_stops_the_command_with_exit_2_naming_it(make_settings, cli_env, capsys):
    cli_env.setenv("MEDGRU_HOME", str(make_settings().home))
    cli_env.setenv("MEDGRU_QUIET_PERIOD_S", "soon")
    assert main(["config"]) == 2
    assert "quiet_period_s" in capsys.readouterr().err


def test_an_id_too_large_for_the_database_is_refused_by_the_admin_commands(make_settings, cli_env, capsys):
    """``medgru jobs show 99999999999999999999`` crashed with the driver's OverflowError (SQLite; out of range on
    PostgreSQL); every id argument of the admin commands now takes 1 to 2**31 - 1 and refuses the rest."""
    import pytest

    cli_env.setenv("MEDGRU_HOME", str(make_settings().home))
    for argv in (["jobs", "show"], ["jobs", "retry"], ["jobs", "cancel"], ["outbox", "resend"],
                 ["quarantine", "show"], ["quarantine", "retry"]):
        for bad in ("99999999999999999999", str(2**31), "0", "x"):
            with pytest.raises(SystemExit) as exit_:
                main([*argv, bad])
            assert exit_.value.code == 2, (argv, bad)
            assert "is not an id" in capsys.readouterr().err
    assert main(["jobs", "show", str(2**31 - 1)]) == 1  # the largest id is looked up: no such job
    assert "no job" in capsys.readouterr().out


SECRET = "Hospital-Adm1n-Pw"


def _no_medgru_env(monkeypatch, tmp_path):
    import os

    for k in list(os.environ):
        if k.startswith("MEDGRU_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MEDGRU_HOME", str(tmp_path / "home"))


def test_a_settings_error_names_the_reason_and_never_the_dashboard_password(monkeypatch, tmp_path, capsys):
    """pydantic printed a settings error's whole input, and with the production layout (TOML + the password
    from secrets.env) the dashboard password was in it, in clear, in journald. Found by a review helper."""
    _no_medgru_env(monkeypatch, tmp_path)
    monkeypatch.setenv("MEDGRU_DASHBOARD_PASSWORD", SECRET)
    monkeypatch.setenv("MEDGRU_ALLOWED_CALLING_AES", "ORTHANC")
    monkeypatch.setenv("MEDGRU_ROUTES", "CARDIO=CARDIO@cardio.example:104")  # refused by the allow-list
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert "routes name CARDIO" in err and SECRET not in err and SECRET[-8:] not in err, err

    monkeypatch.delenv("MEDGRU_ROUTES")
    toml = tmp_path / "medgru.toml"
    toml.write_text(f'home = "{tmp_path / "home"}"\nsend_tls = true\n')  # TLS on without its files: refused
    assert main(["--config", str(toml), "config"]) == 2
    err = capsys.readouterr().err
    assert "TLS is on" in err and SECRET not in err and SECRET[-8:] not in err, err


def test_config_masks_a_password_given_as_a_url_query_parameter():
    """libpq also takes the password as a query parameter; ``medgru config`` showed it."""
    from medgru.commands import hide_url_password

    shown = hide_url_password("postgresql+psycopg:///medgru?host=db.example&user=medgru&password=DbS3cret",
                              database=True)
    assert "DbS3cret" not in shown and "db.example" in shown and "user=medgru" in shown, shown
    shown = hide_url_password("amqp://broker.example:5672//?user=mq&password=MqS3cret")
    assert "MqS3cret" not in shown and "broker.example" in shown, shown


def test_db_downgrade_takes_the_database_back_for_an_older_release(make_settings, cli_env, capsys):
    """There was no way to go back to the older release after an upgrade but Python: `medgru` had no command for
    the schema, and the older release then failed on the newer revision with a traceback. `medgru db status`
    says where the schema is, `medgru db downgrade REV` undoes the later migrations, and a database that a
    newer release migrated stops every command with exit 2 and the way back."""
    from sqlalchemy import create_engine, inspect, text

    settings = make_settings()
    cli_env.setenv("MEDGRU_HOME", str(settings.home))
    assert main(["db", "upgrade"]) == 0
    assert main(["db", "status"]) == 0
    assert "schema revision 0010" in capsys.readouterr().out

    assert main(["db", "downgrade", "0007"]) == 0
    engine = create_engine(settings.effective_database_url)
    try:
        assert "heartbeat_at" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
        assert "refusals" not in {c["name"] for c in inspect(engine).get_columns("outbox")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0007"
        capsys.readouterr()
        assert main(["db", "status"]) == 1  # not at this release's schema
        assert "schema revision 0007" in capsys.readouterr().out
        assert main(["db", "downgrade", "0042"]) == 2
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and "0042" in err and not out

        assert main(["db", "upgrade"]) == 0
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
        capsys.readouterr()
        assert main(["jobs", "list"]) == 2
        err = capsys.readouterr().err
        assert "0099" in err and "medgru db downgrade 0010" in err
    finally:
        engine.dispose()


def test_db_status_on_a_fresh_home_says_there_is_no_schema_yet(cli_env, tmp_path, capsys):
    """`medgru db status` before the first `medgru serve` reported the embedded database as an outage
    ("did not answer: unable to open database file") where the home's folder was not there yet, and where
    it was, created an empty database file. It says there is no schema yet, and creates nothing."""
    home = tmp_path / "fresh-home"
    cli_env.setenv("MEDGRU_HOME", str(home))
    cli_env.delenv("MEDGRU_DATABASE_URL", raising=False)
    assert main(["db", "status"]) == 1  # not at this release's schema
    captured = capsys.readouterr()
    assert "(none: no medgru tables yet)" in captured.out and "did not answer" not in captured.err
    home.mkdir()
    assert main(["db", "status"]) == 1
    assert "(none: no medgru tables yet)" in capsys.readouterr().out
    assert list(home.iterdir()) == []


def test_serve_says_which_address_is_taken_and_exits_1(make_settings, cli_env, capsys):
    """A DICOM or dashboard port already taken (another PACS on 11112, anything on 8080) stopped `medgru serve`
    with an OSError traceback that named neither the part nor the address; it now says which, in one line."""
    import signal
    import socket

    cli_env.setenv("MEDGRU_HOME", str(make_settings().home))
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        try:
            for part, env in (("DICOM listener", {"MEDGRU_LISTEN_PORT": str(port), "MEDGRU_DASHBOARD_PORT": "0"}),
                              ("dashboard", {"MEDGRU_LISTEN_PORT": "0", "MEDGRU_DASHBOARD_PORT": str(port)})):
                for key, value in env.items():
                    cli_env.setenv(key, value)
                assert main(["serve", "--no-worker"]) == 1
                err = capsys.readouterr().err
                assert f"error: the {part} cannot listen on 127.0.0.1:{port}" in err
                assert "Traceback" not in err
        finally:
            signal.signal(signal.SIGTERM, handlers[0])
            signal.signal(signal.SIGINT, handlers[1])
