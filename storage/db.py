"""Engine and session factories. SQLite (embedded default) and PostgreSQL (by URL).

:func:`init_db` brings a database to the newest schema (``alembic upgrade head`` through the migrations
shipped in ``storage/migrations``) and returns an engine. It is idempotent and may be called by several
processes at once (``medgru serve`` and a worker): on PostgreSQL the upgrade runs under a transaction-level
advisory lock, on SQLite under an exclusive ``flock`` on ``<database file>.migrate-lock``, so exactly one
process creates the tables and the others find the schema at head.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock key for schema migrations (any constant shared by all medgru processes)
_PG_MIGRATION_LOCK_KEY = 0x6D656467  # "medg"


def make_engine(url: str, **kwargs) -> Engine:
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # durability + concurrency for the embedded default
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` for the packaged migrations; with ``connection``, env.py migrates it."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        yield  # private in-memory database: nobody else can see it
        return
    lock_path = Path(database).resolve().with_name(Path(database).name + ".migrate-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _sqlite_foreign_keys_off(conn: Connection) -> Iterator[None]:
    """Foreign keys unenforced on this SQLite connection while a migration copies tables, then checked.

    A batch migration replaces a table by a copy: the DROP of the original, with keys enforced, fails
    while another table's rows refer to it (outbox → results). SQLite ignores the pragma inside a
    transaction, so it is set before the migration's transaction begins (pysqlite opens none for a
    PRAGMA); ``foreign_key_check`` then refuses to commit a migration that left a dangling reference.
    """
    if conn.dialect.name != "sqlite":
        yield
        return
    conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
    conn.commit()
    try:
        yield
    finally:
        conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        conn.commit()


def _check_foreign_keys(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        dangling = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if dangling:
            raise RuntimeError(f"migration left rows referring to missing rows (table, rowid, parent): {dangling[:5]}")


class SchemaMismatch(RuntimeError):
    """The database's schema is not this release's, and this caller may not change that; the message says
    what to do."""


class SchemaNewerThanRelease(SchemaMismatch):
    """The database is at a schema revision this release's migrations do not know: a newer release migrated
    it. Alembic's own error (``Can't locate revision identified by '0010'``, a traceback) named no way out."""


class SchemaOlderThanRelease(SchemaMismatch):
    """The database is at an older revision and the caller (an admin command) does not migrate: ``medgru jobs
    list`` run after installing the new release, before the older service was stopped, migrated the database
    under the running older service."""


def head_revision() -> str:
    """The newest schema revision this release's migrations reach."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head() or ""


def schema_revisions(conn: Connection) -> tuple[str, ...]:
    """The revision(s) the database at ``conn`` is at (empty: no medgru schema yet)."""
    from alembic.runtime.migration import MigrationContext

    return tuple(MigrationContext.configure(conn).get_current_heads())


def known_revisions() -> set[str]:
    """Every schema revision this release's migrations know."""
    from alembic.script import ScriptDirectory

    return {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def _refuse_unknown_revision(conn: Connection) -> None:
    known = known_revisions()
    unknown = [rev for rev in schema_revisions(conn) if rev not in known]
    if unknown:
        head = head_revision()
        raise SchemaNewerThanRelease(
            f"the database's schema is at revision {', '.join(unknown)}, which this release does not know (its "
            f"newest is {head}): a newer medgru release migrated it. Either run that release again, or, to go "
            f"back to this one, first run the newer release's `medgru db downgrade {head}` (or restore the backup "
            "taken before the upgrade)")


def _migrate(engine: Engine, revision: str, *, down: bool = False, upgrade_existing: bool = True) -> None:
    lock = _sqlite_file_lock(engine) if engine.dialect.name == "sqlite" else contextlib.nullcontext()
    with lock, engine.connect() as conn, _sqlite_foreign_keys_off(conn), conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_KEY})
        _refuse_unknown_revision(conn)
        current = schema_revisions(conn)
        if not down and not upgrade_existing and current and current != (head_revision(),):
            raise SchemaOlderThanRelease(
                f"the database's schema is at revision {', '.join(current)}, this release's is {head_revision()}: "
                "stop the older release's processes (medgru serve and every worker), then start this "
                "release's `medgru serve`, which migrates it (or run `medgru db upgrade`)")
        cfg = alembic_config(conn)
        if down:
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)
        _check_foreign_keys(conn)


def init_db(url: str, *, upgrade_existing: bool = True) -> Engine:
    """Upgrade the database at ``url`` to the newest schema and return an engine for it.

    Safe to call on every start and from several processes at once. Raises whatever the database
    raises (unreachable server, permissions); nothing is half-applied on PostgreSQL (transactional DDL).
    :class:`SchemaNewerThanRelease` where a newer release migrated the database. With ``upgrade_existing``
    false (the admin commands) only an empty database gets the schema; one at an older revision raises
    :class:`SchemaOlderThanRelease` instead of being migrated under a service that may still run on it.
    """
    engine = make_engine(url)
    try:
        _migrate(engine, "head", upgrade_existing=upgrade_existing)
    except BaseException:
        engine.dispose()
        raise
    # no password in the log: neither the URL's own nor libpq's ?password= (the query is left out whole)
    log.info("database schema at head (%s)", engine.url.set(query={}).render_as_string(hide_password=True))
    return engine


def downgrade_db(url: str, revision: str = "base") -> None:
    """``alembic downgrade <revision>`` on ``url`` (``base`` drops every medgru table): ``medgru db downgrade``,
    before an older release runs on the database again. Each step drops what its upgrade added."""
    engine = make_engine(url)
    try:
        _migrate(engine, revision, down=True)
    finally:
        engine.dispose()


def error_line(exc: BaseException) -> str:
    """The first line of what ``exc`` says (the driver's own error where SQLAlchemy wraps one), or its type's
    name where it says nothing: for a one-line log message or report."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def database_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` is the database not answering (refused, dropped, timed out), not a bug or a refusal."""
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


class PassLog:
    """How a service loop logs its failed passes. An unreachable database (:func:`database_unreachable`) is
    one line when the outage begins, a reminder every ``repeat_s`` while it lasts and a line when a pass
    succeeds again; any other error keeps its traceback. The loops run every second: with PostgreSQL away
    the sender and the assembler logged a 40-line traceback each, twice a second, for the whole outage."""

    def __init__(self, logger: logging.Logger, what: str, *, repeat_s: float = 60.0) -> None:
        self.logger, self.what, self.repeat_s = logger, what, repeat_s
        self._outage_since: float | None = None
        self._last_said = 0.0

    def failed(self, exc: BaseException, retry_in_s: float) -> None:
        if not database_unreachable(exc):
            self.logger.error("%s failed; retrying in %g s", self.what, retry_in_s, exc_info=exc)
            return
        now = time.monotonic()
        reason = error_line(exc)
        if self._outage_since is None:
            self._outage_since = self._last_said = now
            self.logger.error("%s failed: the database does not answer (%s); retrying every %g s",
                              self.what, reason, retry_in_s)
        elif now - self._last_said >= self.repeat_s:
            self._last_said = now
            self.logger.error("%s: the database has not answered for %.0f s (%s); retrying every %g s",
                              self.what, now - self._outage_since, reason, retry_in_s)

    def succeeded(self) -> None:
        if self._outage_since is not None:
            self.logger.warning("%s: the database answers again after %.0f s", self.what,
                                time.monotonic() - self._outage_since)
            self._outage_since = None
