"""Alembic revisions of the registry schema, oldest first."""
