"""Per-test database isolation shared by the storage and assembly tests.

SQLite: the ``database_url`` fixture already points into the test's tmp_path. PostgreSQL: the session's
database is shared, so each test gets its own schema (``search_path`` set through the URL) that is dropped
afterwards; Alembic's version table lives in that schema too.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

from sqlalchemy import create_engine, text


@contextmanager
def isolated_url(database_url: str) -> Iterator[str]:
    if not database_url.startswith("postgresql"):
        yield database_url
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        sep = "&" if "?" in database_url else "?"
        yield f"{database_url}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
