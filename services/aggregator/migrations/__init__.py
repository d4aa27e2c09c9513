"""Alembic migrations of the aggregator schema (tables ``agg_*``); run with
``services.aggregator.db.DATABASE.migrate(engine)``."""
