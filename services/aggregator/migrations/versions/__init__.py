"""Alembic revisions of the aggregator schema, oldest first."""
