"""Fixtures shared by the whole suite: the data folder, settings in a temporary home, databases.

Real peers are required: a test that needs PostgreSQL, Redis, Orthanc or dcmtk fails when the peer is
missing; it never skips.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from medgru.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get("MEDGRU_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MEDGRU_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _data_root() -> Path:
    env = os.environ.get("MEDGRU_DATA_ROOT")
    root = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return root.resolve()


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    assert (root / "README.md").is_file(), f"benchmark data not found at {root} (set MEDGRU_DATA_ROOT)"
    return root


@pytest.fixture(scope="session")
def dicom_corpus(data_root: Path) -> Path:
    return data_root / "dicom"


@pytest.fixture
def cli_env(monkeypatch):
    """An environment without the developer's MEDGRU_* settings (the data root stays) for tests that run
    the ``medgru`` command line; set what the test needs on the returned ``monkeypatch``."""
    for key in list(os.environ):
        if key.startswith("MEDGRU_") and key != "MEDGRU_DATA_ROOT":
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.fixture
def make_settings(tmp_path: Path):
    """Build a Settings with its home under tmp_path; keyword arguments override fields."""

    def factory(**overrides) -> Settings:
        overrides.setdefault("home", tmp_path / "home")
        overrides.setdefault("data_root", _data_root())
        s = Settings(**overrides)
        s.ensure_dirs()
        return s

    return factory


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    from sqlalchemy import create_engine, text

    name = f"medgru_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> str:
    """Each database test runs on the embedded SQLite and on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.sqlite3'}"
    return request.getfixturevalue("postgres_url")
