"""The worker process's Celery app (:mod:`worker.celery_app`): its log level, and the flags the systemd unit
starts a standalone worker with."""

from __future__ import annotations

import logging
from pathlib import Path

import worker.celery_app as celery_app
from worker.embedded import worker_command

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "medgru-worker@.service"


def test_the_worker_logs_at_the_settings_log_level(make_settings, monkeypatch):
    """The standalone unit passes no --loglevel (Celery's default, WARNING, hid every job's line): the
    worker's own app sets the level its settings say once Celery has set up logging."""
    from celery.signals import after_setup_logger

    target = logging.getLogger("medgru-test-worker-root")
    monkeypatch.setattr(celery_app, "_app", celery_app.make_celery(make_settings(log_level="DEBUG")))
    celery_app._connect_log_level()
    target.setLevel(logging.WARNING)
    after_setup_logger.send(sender=None, logger=target, loglevel=logging.WARNING, logfile=None, format="",
                            colorize=False)
    assert target.level == logging.DEBUG
    monkeypatch.setattr(celery_app, "_app", None)  # an app made by make_celery alone: left as Celery set it
    target.setLevel(logging.WARNING)
    after_setup_logger.send(sender=None, logger=target, loglevel=logging.WARNING, logfile=None, format="",
                            colorize=False)
    assert target.level == logging.WARNING


def test_the_unit_starts_the_worker_with_the_embedded_workers_flags(make_settings):
    """One tested configuration: the pool and the flags of the worker `medgru serve` starts itself."""
    exec_start = next(line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart="))
    unit_flags = {f.split("=")[0] for f in exec_start.split() if f.startswith("--")}
    embedded = worker_command(make_settings(), "q")
    assert "--loglevel" not in unit_flags
    assert {"--pool", "--concurrency", "--without-gossip", "--without-mingle", "--without-heartbeat"} <= unit_flags
    assert embedded[embedded.index("--pool") + 1] == "solo" and "--pool=solo" in exec_start
