"""The ``medgru`` command: the composition root of the service.

Each area contributes its sub-commands through a ``register(subparsers)`` function in its own module
(listed in ``_COMMAND_MODULES``); each sub-command stores a handler ``func(args, settings) -> int``.
Settings are built once here and handed down.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from medgru import __version__
from medgru.settings import Settings, load_settings

_COMMAND_MODULES = (
    "medgru.commands",  # serve, demo, config
    "training.cli",  # train, evaluate, calibrate
    "worker.cli",  # jobs: list, show, retry, cancel
    "dispatch.cli",  # outbox: list, resend
    "pacs_listener.cli",  # quarantine: list, show
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medgru", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"medgru {__version__}")
    parser.add_argument("--config", type=Path, help="TOML settings file (else $MEDGRU_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,  # one of logging's names (the settings refuse any other)
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom logs every PDU and DIMSE message at INFO; keep its warnings and errors only
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    from medgru.logsafe import install

    install()  # pydicom's warnings quote values (a birth date, say): redacted


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(config_file=args.config)
    except ValueError as exc:  # a missing config file, a value out of range: the message names it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:
        return int(args.func(args, settings) or 0)
    except Exception as exc:
        from storage.db import SchemaMismatch

        if isinstance(exc, SchemaMismatch):  # not this release's schema, and not this command's to change
            print(f"error: {exc}", file=sys.stderr)
            return 2
        outage = outage_message(exc, settings)
        if outage is None:
            raise
        from medgru.tables import printable

        print(f"error: {printable(outage)}", file=sys.stderr)  # the driver's words may quote a peer's
        return 1


def outage_message(exc: BaseException, settings: Settings) -> str | None:
    """One line for an expected outage (the database or the broker does not answer), passwords masked;
    ``None`` for any other error, which keeps its traceback. A page of traceback (the database's
    is 60 lines) hid the one line an admin needs."""
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import OperationalError as DatabaseError

    from medgru.commands import hide_url_password
    from storage.db import error_line

    if isinstance(exc, DatabaseError):
        url = hide_url_password(settings.effective_database_url, database=True)
        return f"the database {url} did not answer: {error_line(exc)}"
    from worker.tasks import BrokerUnavailable

    if isinstance(exc, BrokerUnavailable) and exc.__cause__ is not None:
        exc = exc.__cause__  # kombu's error; the broker is named below
    if isinstance(exc, (BrokerError, BrokerUnavailable)):
        from kombu.utils.url import maybe_sanitize_url

        return (f"the broker {maybe_sanitize_url(settings.effective_broker_url)} did not answer: {error_line(exc).rstrip('.')}. "
                "A job already put back in the database is sent to the queue by `medgru serve` within "
                f"requeue_after_s ({settings.requeue_after_s:g} s) once the broker answers")
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
