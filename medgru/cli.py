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
    from sqlalchemy.exc import OperationalError

    try:
        return int(args.func(args, settings) or 0)
    except OperationalError as exc:  # the database is away or refuses us: one line, not 120 of traceback
        from medgru.commands import hide_url_password
        from medgru.tables import printable

        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
        print(f"error: the database did not answer ({hide_url_password(settings.effective_database_url, database=True)}): "
              f"{printable(reason)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
