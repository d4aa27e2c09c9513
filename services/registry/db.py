"""The registry's database: its schema (Alembic migrations in ``migrations/``, own version table) and its URL.

Engines and migrations are built by :mod:`services.common.db`; the names below are this schema's bindings.
"""

from __future__ import annotations

from pathlib import Path

from services.common.db import Database

VERSION_TABLE = "registry_alembic_version"  # own table: services can share one database
DATABASE = Database(Path(__file__).resolve().parent / "migrations", VERSION_TABLE, sqlite_synchronous="NORMAL")

make_engine = DATABASE.engine
migrate = DATABASE.migrate
current_revision = DATABASE.current_revision
head_revision = DATABASE.head_revision


def default_db_url(data_dir: str | Path) -> str:
    """``sqlite:///<data_dir>/registry.db``."""
    return f"sqlite:///{Path(data_dir).resolve() / 'registry.db'}"
