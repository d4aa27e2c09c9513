"""Alembic environment for the registry; run programmatically by ``services.registry.db.DATABASE.migrate``
(no alembic.ini)."""

from services.common.migrations import run_env
from services.registry.db import VERSION_TABLE
from services.registry.models import Base

run_env(Base.metadata, version_table=VERSION_TABLE)
