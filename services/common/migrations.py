"""Running a service's Alembic environment: shared by every service's ``migrations/env.py``.

Each service keeps its own version table, so several services can migrate one database (or schema) independently.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, MetaData, create_engine


def run_env(target_metadata: MetaData, version_table: str) -> None:
    """Run the migrations Alembic asked for: offline (SQL script) or online (on the connection the caller passed in
    ``config.attributes["connection"]``, else on a new engine from ``sqlalchemy.url``)."""
    config = context.config

    def run(connection: Connection | None = None) -> None:
        if connection is None:
            context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True,
                              target_metadata=target_metadata, render_as_batch=True, version_table=version_table)
        else:
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                              version_table=version_table)
        with context.begin_transaction():
            context.run_migrations()

    if context.is_offline_mode():
        run()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")  # plain `alembic` CLI use with a URL
    with engine.connect() as conn:
        run(conn)
    engine.dispose()
