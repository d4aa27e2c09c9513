"""SQL engines and Alembic schema migrations for every service's database (SQLite by default, PostgreSQL).

A service describes its database with a :class:`Database`: its ``migrations/`` directory, its own version table (so
services can share one database or schema) and how durable SQLite commits must be. This module owns how an engine is
built for a URL and how a schema is upgraded; the services own their tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from raffm.errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, *, sqlite_synchronous: str = "NORMAL", **kwargs: Any) -> Engine:
    """An engine tuned per backend: SQLite gets WAL, a busy timeout, foreign keys and ``PRAGMA synchronous`` as given;
    PostgreSQL a sized, pre-pinged pool. ``ConfigError`` for a URL that is not a supported database."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises several types for bad URLs
        raise ConfigError(f"--db {url!r} is not a database URL: {exc}", field="--db",
                          hint="use sqlite:///path/service.db or postgresql+psycopg://user@host:port/db") from exc
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
        if not in_memory:
            Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            # One shared connection for an in-memory database, or every connection would see its own empty DB.
            **({"poolclass": StaticPool} if in_memory else {"pool_size": 8, "max_overflow": 8}),
            **kwargs,
        )

        def pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets readers run while one writer commits; the busy timeout makes writers queue instead of failing.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            cursor.close()

        event.listen(engine, "connect", pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_engine(parsed, pool_size=10, max_overflow=10, pool_pre_ping=True, **kwargs)
    raise ConfigError(f"unsupported database {parsed.get_backend_name()!r} in --db", field="--db",
                      hint="use sqlite:///... or postgresql+psycopg://...")


@dataclass(frozen=True)
class Database:
    """One service's schema: where its migrations live, the table that records their revision, the SQLite
    ``synchronous`` level its commits need (``FULL`` when an acknowledged write must survive power loss), and the
    file name of its default SQLite database."""

    migrations_dir: Path
    version_table: str
    sqlite_synchronous: str = "NORMAL"
    default_file: str = "service.db"

    def default_url(self, data_dir: str | Path) -> str:
        """``sqlite:///<data_dir>/<default_file>``: the database a service uses when given no URL."""
        return f"sqlite:///{Path(data_dir).resolve() / self.default_file}"

    def engine(self, url: str, **kwargs: Any) -> Engine:
        return make_engine(url, sqlite_synchronous=self.sqlite_synchronous, **kwargs)

    def migrate(self, engine: Engine, revision: str = "head") -> str | None:
        """Upgrade the schema to ``revision`` (idempotent); returns the revision now applied."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(self.migrations_dir))
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
        with engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)
        return self.current_revision(engine)

    def current_revision(self, engine: Engine) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": self.version_table})
            return context.get_current_revision()

    def head_revision(self) -> str | None:
        from alembic.script import ScriptDirectory

        return ScriptDirectory(str(self.migrations_dir)).get_current_head()

    def migrate_url(self, url: str) -> str | None:
        """Open ``url``, upgrade it to the head revision, close it; returns the revision now applied."""
        engine = self.engine(url)
        try:
            return self.migrate(engine)
        finally:
            engine.dispose()
