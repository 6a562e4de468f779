"""The Celery application of the job queue.

The broker is ``settings.effective_broker_url``:

* the embedded default, kombu's ``filesystem://`` transport: messages are files under
  ``settings.broker_dir`` (``queue/`` for messages, ``control/`` for exchanges); no server is needed and
  producer and worker may live in different processes on the same machine;
* Redis in production (``MEDGRU_BROKER_URL=redis://host:6379/N``).

There is no result backend: the state of a job lives in our database. Tasks are acknowledged late and
rejected (re-queued) if the worker dies under them; a worker takes one message at a time.

``celery -A worker.celery_app worker`` finds the module-level ``app``, built on first access from
:func:`medgru.settings.load_settings` (or, for a worker started by :mod:`worker.embedded`, from the
settings its parent passed in ``MEDGRU_SETTINGS_JSON``). This module is a composition root: it is the
only place in ``worker`` that reads the environment.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery

from medgru.settings import Settings, load_settings

#: the queue jobs go to unless a caller names another (tests use one queue each)
DEFAULT_QUEUE = "medgru.jobs"
#: environment variables through which :mod:`worker.embedded` hands a worker process its settings/queue
SETTINGS_ENV = "MEDGRU_SETTINGS_JSON"
QUEUE_ENV = "MEDGRU_WORKER_QUEUE"
#: the embedded broker's transport: kombu's filesystem transport with whole-or-nothing messages
EMBEDDED_TRANSPORT = "worker.filesystem_broker:Transport"
#: seconds between polls of the filesystem transport's queue folder
FILESYSTEM_POLLING_INTERVAL_S = 0.25
#: Redis re-delivers a message not acknowledged within this many seconds (must exceed the longest job
#: plus its retry countdown)
REDIS_VISIBILITY_TIMEOUT_S = 3 * 3600


def filesystem_transport_options(settings: Settings) -> dict[str, Any]:
    """``broker_transport_options`` of the embedded filesystem broker (folders created here)."""
    queue_dir = settings.broker_dir / "queue"
    processed_dir = settings.broker_dir / "processed"
    control_dir = settings.broker_dir / "control"
    for d in (queue_dir, processed_dir, control_dir):
        d.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "processed_folder": str(processed_dir),
        "control_folder": str(control_dir),
        "store_processed": False,
        "polling_interval": FILESYSTEM_POLLING_INTERVAL_S,
    }


def make_celery(settings: Settings, *, queue: str = DEFAULT_QUEUE) -> Celery:
    """A Celery app for ``settings``: jobs go to ``queue`` on ``settings.effective_broker_url``.

    The app carries the settings (``app.medgru_settings``) so that its tasks build their database
    engine and model registry from them, once per worker process.
    """
    from medgru.logsafe import install

    install()  # pydicom's warnings on the spool files quote no values
    broker = settings.effective_broker_url
    app = Celery("medgru", broker=broker, set_as_current=False)
    conf: dict[str, Any] = {
        "broker_url": broker,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": queue,
        "task_create_missing_queues": True,
        "broker_connection_retry_on_startup": True,
        "enable_utc": True,
        "timezone": "UTC",
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }
    if settings.uses_embedded_broker:
        conf["broker_transport_options"] = filesystem_transport_options(settings)
        # kombu's filesystem transport, writing each message whole or not at all (a full disk); by its
        # alias, so that the broker's URL (as Celery logs it) stays filesystem://
        from kombu.transport import TRANSPORT_ALIASES

        TRANSPORT_ALIASES["filesystem"] = EMBEDDED_TRANSPORT
    elif broker.startswith(("redis://", "rediss://")):
        conf["broker_transport_options"] = {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    app.conf.update(conf)
    app.medgru_settings = settings  # type: ignore[attr-defined]
    app.medgru_queue = queue  # type: ignore[attr-defined]

    import worker.tasks  # noqa: F401  (registers the shared tasks with every app)

    return app


def settings_from_environment() -> Settings:
    """The settings of a worker process: those its parent passed, else the usual sources."""
    raw = os.environ.get(SETTINGS_ENV)
    if raw:
        return Settings(**json.loads(raw))
    return load_settings()


_app: Celery | None = None


def _settings_log_level(logger=None, **_: Any) -> None:
    """Celery's ``after_setup_logger``: the worker process logs at ``settings.log_level``, whatever
    ``--loglevel`` said (the standalone unit passes none; Celery's default is WARNING, which hid every job's
    line). Only for the worker's own app (:data:`_app`); an app made by :func:`make_celery` alone is left
    as it is."""
    if _app is not None and logger is not None:
        logger.setLevel(_app.medgru_settings.log_level)  # type: ignore[attr-defined]


def _connect_log_level() -> None:
    from celery.signals import after_setup_logger

    after_setup_logger.connect(_settings_log_level, weak=False, dispatch_uid="medgru-settings-log-level")


def __getattr__(name: str) -> Any:
    """``app``/``celery`` are built on first access, so importing this module has no side effects."""
    global _app
    if name in ("app", "celery"):
        if _app is None:
            _app = make_celery(settings_from_environment(), queue=os.environ.get(QUEUE_ENV) or DEFAULT_QUEUE)
            _connect_log_level()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
