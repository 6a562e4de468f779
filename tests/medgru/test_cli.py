"""The ``medgru`` entry point (:mod:`medgru.cli`)."""

from __future__ import annotations

from medgru.cli import main


def test_a_database_that_does_not_answer_is_one_line_and_exit_1(cli_env, tmp_path, capsys):
    """``medgru jobs list`` with the database away printed a 120-line traceback: one line now, naming the
    database (its password hidden) and why, and exit status 1."""
    cli_env.setenv("MEDGRU_HOME", str(tmp_path / "home"))
    cli_env.setenv("MEDGRU_DATABASE_URL", "postgresql+psycopg://medgru:TopSecret@127.0.0.1:1/medgru")
    assert main(["jobs", "list"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "TopSecret" not in out + err
    [line] = err.strip().splitlines()
    assert line.startswith("error: the database did not answer (postgresql+psycopg://medgru:***@127.0.0.1:1/medgru)")
