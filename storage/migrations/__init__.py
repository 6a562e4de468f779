"""Alembic migrations of the medgru database, shipped inside the package.

Run them with :func:`storage.db.init_db` (programmatic ``alembic upgrade head``); no ``alembic.ini`` is
needed at run time. For development (a new revision after changing ``storage/models.py``)::

    alembic -c storage/migrations/alembic.ini -x url=sqlite:///scratch.sqlite3 upgrade head
    alembic -c storage/migrations/alembic.ini -x url=sqlite:///scratch.sqlite3 revision --autogenerate -m "..."
"""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
