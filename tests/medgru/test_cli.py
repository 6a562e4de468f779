"""``medgru`` (medgru/cli.py): an expected outage is one clear line, not a traceback."""

from __future__ import annotations

import socket

from medgru.cli import main
from storage.db import init_db, make_session_factory
from storage.models import Job, JobState
from tests.worker.conftest import BRAINIX, add_series


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_database_is_one_line_with_its_password_masked(cli_env, make_settings, capsys):
    port = _closed_port()
    cli_env.setenv("MEDGRU_HOME", str(make_settings().home))
    cli_env.setenv("MEDGRU_DATABASE_URL", f"postgresql+psycopg://medgru:s3cret@127.0.0.1:{port}/medgru")
    assert main(["jobs", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: the database postgresql+psycopg://medgru:***@127.0.0.1:{port}/medgru did not answer")
    assert "Connection refused" in err and "Traceback" not in err and "s3cret" not in err
    assert len(err.strip().splitlines()) == 1


def test_an_unreachable_broker_on_retry_says_the_job_waits_in_the_database(cli_env, make_settings, dicom_corpus,
                                                                          capsys):
    """The retry commits the job QUEUED before it enqueues; with the broker away the admin is told that
    `medgru serve` sends it once the broker answers (it did: the sweeper), not shown kombu's traceback."""
    settings = make_settings(broker_url=f"redis://:pw@127.0.0.1:{_closed_port()}/0")
    sf = make_session_factory(init_db(settings.effective_database_url))
    job_id = add_series(settings, sf, dicom_corpus, BRAINIX, body_part="BRAIN", limit=1)
    with sf() as s:
        s.get(Job, job_id).state = JobState.FAILED
        s.commit()
    cli_env.setenv("MEDGRU_HOME", str(settings.home))
    cli_env.setenv("MEDGRU_BROKER_URL", settings.broker_url)
    assert main(["jobs", "retry", str(job_id)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the broker redis://:**@127.0.0.1:") and "requeue_after_s (300 s)" in err
    assert "Traceback" not in err and ":pw@" not in err
    with sf() as s:
        assert s.get(Job, job_id).state is JobState.QUEUED
