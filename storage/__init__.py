"""Durable state: SQLAlchemy models, engine/session factories and Alembic migrations."""
