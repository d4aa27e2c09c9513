"""The aggregator's database (the round store): its schema, owned by the Alembic migrations in ``migrations/`` and
applied at start (and by ``raffm aggregator migrate``), recorded in its own version table so the aggregator and the
registry can share one database or schema.

Engines and migrations are built by :mod:`services.common.db`; SQLite commits here are ``synchronous=FULL``: an
acknowledged update must survive power loss, not only ``kill -9``.
"""

from __future__ import annotations

from pathlib import Path

from services.common.db import Database

VERSION_TABLE = "aggregator_alembic_version"  # own table: services can share one database
DATABASE = Database(Path(__file__).resolve().parent / "migrations", VERSION_TABLE, sqlite_synchronous="FULL")

make_engine = DATABASE.engine
migrate = DATABASE.migrate
current_revision = DATABASE.current_revision
head_revision = DATABASE.head_revision


def default_db_url(data_dir: str | Path) -> str:
    """``sqlite:///<data_dir>/aggregator.db``."""
    return f"sqlite:///{Path(data_dir).resolve() / 'aggregator.db'}"
