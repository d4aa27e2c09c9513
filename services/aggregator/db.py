"""The aggregator's database (the round store): its schema, owned by the Alembic migrations in ``migrations/`` and
applied at start (and by ``raffm aggregator migrate``), recorded in its own version table so the aggregator and the
registry can share one database or schema.

Engines and migrations are built by :class:`services.common.db.Database`; SQLite commits here are
``synchronous=FULL``: an acknowledged update must survive power loss, not only ``kill -9``.
"""

from __future__ import annotations

from pathlib import Path

from services.common.db import Database

VERSION_TABLE = "aggregator_alembic_version"  # own table: services can share one database
DATABASE = Database(Path(__file__).resolve().parent / "migrations", VERSION_TABLE, sqlite_synchronous="FULL",
                    default_file="aggregator.db")
