"""``medgru serve``, ``medgru demo``, ``medgru prune``, ``medgru config`` and ``medgru db``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the service: DICOM listener, assembler, worker, sender, dashboard")
    p.add_argument("--no-worker", action="store_true", help="do not start a worker (workers run elsewhere)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="run the whole loop once on sample series and print the findings")
    p.add_argument("--data-root", type=Path, help="benchmark data folder (default: settings.data_root)")
    p.add_argument("--input", type=Path, action="append", help="DICOM file or folder to send (repeatable)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every result")
    p.add_argument("--home", type=Path, help="data folder for this run (default: <MEDGRU_HOME>/demo)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("prune", help="apply retention now: remove old spool, sent-result and quarantined files")
    p.add_argument("--dry-run", action="store_true", help="only count what would be removed")
    p.set_defaults(func=_prune)

    p = sub.add_parser("config", help="print the effective settings as JSON")
    p.set_defaults(func=_config)

    p = sub.add_parser("db", help="the database schema: status, upgrade, downgrade (before going back to an "
                                  "older release)")
    db = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    q = db.add_parser("status", help="the database's schema revision and this release's newest")
    q.set_defaults(func=_db_status)
    q = db.add_parser("upgrade", help="migrate the database to this release's schema (medgru serve does it "
                                      "at start)")
    q.set_defaults(func=_db_upgrade)
    q = db.add_parser("downgrade", help="undo migrations down to REVISION, the newest an older release knows "
                                        "(stop every medgru process first; drops what the later ones added)")
    q.add_argument("revision", metavar="REVISION", help="e.g. 0007 (the older release's newest: its "
                                                        "storage/migrations/versions/)")
    q.set_defaults(func=_db_downgrade)


def _serve(args, settings) -> int:
    from medgru.service import Service, StartError

    service = Service(settings, with_worker=not args.no_worker)

    def _terminate(signum, _frame):
        log.info("signal %s: stopping", signum)
        service._stop.set()

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        service.start()
        service.wait()
    except StartError as exc:  # what started before it (the embedded worker, the listener) stops below
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        service.stop()
    return 0


def _demo(args, settings) -> int:
    from medgru.demo import run_demo

    return run_demo(settings, data_root=args.data_root, inputs=args.input, timeout=args.timeout, home=args.home)


#: what a URL's password is shown as (SQLAlchemy's own mask)
HIDDEN_PASSWORD = "***"


def hide_url_password(url: str, *, database: bool = False) -> str:
    """``url`` with its password replaced by ``***`` and the rest (user, host, port, path) kept readable, so
    that ``medgru config`` can be pasted into a ticket. ``database``: an SQLAlchemy URL (its own parser
    knows its quirks); else a generic URL, or Celery's ``;``-separated list of failover brokers."""
    if database:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
            # libpq also takes the password as a query parameter (?password=...), which hide_password keeps
            parsed = parsed.set(query={k: (HIDDEN_PASSWORD if k.lower() in _PASSWORD_PARAMS else v)
                                       for k, v in parsed.query.items()})
            return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", HIDDEN_PASSWORD)
        except ArgumentError:
            pass  # not a URL SQLAlchemy reads; the generic parser below still hides what it can
    return ";".join(_hide_one_password(part) for part in url.split(";"))


#: query parameters that carry a password (libpq's ``password``, some brokers' ``password`` / ``pass``)
_PASSWORD_PARAMS = frozenset({"password", "pass", "passwd"})


def _hide_one_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.query:
        query = "&".join(
            f"{k}={HIDDEN_PASSWORD}" if k.lower() in _PASSWORD_PARAMS and sep else f"{k}{sep}{v}"
            for k, sep, v in (p.partition("=") for p in parts.query.split("&")))
        parts = parts._replace(query=query)
        url = urlunsplit(parts)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{HIDDEN_PASSWORD}@{hostport}"))


def _config(args, settings) -> int:
    values = json.loads(settings.model_dump_json())  # SecretStr fields come out masked already
    for name, value in values.items():
        if isinstance(value, str) and "://" in value:  # database_url, broker_url: credentials in the URL
            values[name] = hide_url_password(value, database=name == "database_url")
    print(json.dumps(values, indent=2))
    return 0


def _prune(args, settings) -> int:
    from medgru.tables import open_database
    from storage.retention import prune

    if settings.retention_days <= 0 and settings.quarantine_retention_days <= 0:
        print("retention is off (MEDGRU_RETENTION_DAYS and MEDGRU_QUARANTINE_RETENTION_DAYS are 0): nothing removed")
        return 0
    report = prune(settings, open_database(settings), dry_run=args.dry_run)
    print(report.summary())
    for error in report.errors:
        print(f"error: {error}")
    return 1 if report.errors else 0


def _db_url(settings) -> tuple[str, str]:
    url = settings.effective_database_url
    return url, hide_url_password(url, database=True)


def _db_status(args, settings) -> int:
    from sqlalchemy.engine import make_url

    from storage.db import head_revision, make_engine, schema_revisions

    url, shown = _db_url(settings)
    database = make_url(url).database or ""
    if url.startswith("sqlite") and database not in ("", ":memory:") and not database.startswith("file:") \
            and not Path(database).exists():
        # a fresh home: no database file yet (connecting would create one, or fail where the folder is not
        # there yet and be reported as a database that does not answer)
        current: tuple[str, ...] = ()
    else:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                current = schema_revisions(conn)
        finally:
            engine.dispose()
    head = head_revision()
    print(f"database        {shown}")
    print(f"schema revision {', '.join(current) or '(none: no medgru tables yet)'}")
    print(f"this release    {head}")
    return 0 if current == (head,) else 1


def _db_upgrade(args, settings) -> int:
    from storage.db import head_revision, init_db

    init_db(settings.effective_database_url).dispose()
    print(f"database {_db_url(settings)[1]} at schema revision {head_revision()}")
    return 0


def _db_downgrade(args, settings) -> int:
    from alembic.util import CommandError

    from storage.db import downgrade_db

    try:
        downgrade_db(settings.effective_database_url, args.revision)
    except CommandError as exc:  # no such revision, or one above the database's
        print(f"error: {exc}", file=sys.stderr)  # as every other error of medgru's; it was on stdout
        return 2
    print(f"database {_db_url(settings)[1]} at schema revision {args.revision}")
    return 0
