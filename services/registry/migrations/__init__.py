"""Alembic migrations of the registry schema; run with ``services.registry.db.DATABASE.migrate(engine)``."""
