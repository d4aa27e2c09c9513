"""The registry's database: its schema (Alembic migrations in ``migrations/``, own version table) and default file.

Engines and migrations are built by :class:`services.common.db.Database`.
"""

from __future__ import annotations

from pathlib import Path

from services.common.db import Database

VERSION_TABLE = "registry_alembic_version"  # own table: services can share one database
DATABASE = Database(Path(__file__).resolve().parent / "migrations", VERSION_TABLE, default_file="registry.db")
