"""Alembic environment for the aggregator; run programmatically by ``services.aggregator.db.DATABASE.migrate``
(no alembic.ini)."""

from services.aggregator.db import VERSION_TABLE
from services.aggregator.store import METADATA
from services.common.migrations import run_env

run_env(METADATA, version_table=VERSION_TABLE)
