"""Shared pytest fixtures. Each section belongs to the issue that added it; append new sections below."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# --- SQL databases (issue 3) --------------------------------------------------------------------------------------
# `sql_url` is parametrized: every test that uses it runs on SQLite (a fresh file) and, when RAFFM_TEST_POSTGRES_URL
# points at a server, on PostgreSQL (a fresh schema in a database created for this test session).

POSTGRES_ENV = "RAFFM_TEST_POSTGRES_URL"


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """The PostgreSQL URL given in the environment, or skip."""
    url = os.environ.get(POSTGRES_ENV, "")
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set (.ci/run starts a throw-away PostgreSQL and sets it)")
    return url


@pytest.fixture(scope="session")
def postgres_database_url(postgres_server_url: str) -> Iterator[str]:
    """A database created for this test session (so concurrent runs never collide), dropped afterwards."""
    from services.common.testing import postgres_database

    with postgres_database(postgres_server_url, prefix=f"raffm_test_{os.getpid()}") as url:
        yield url


@pytest.fixture
def postgres_url(postgres_database_url: str) -> Iterator[str]:
    """A fresh schema per test (selected through search_path), dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(postgres_database_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(postgres_database_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL with an empty database: SQLite file, or PostgreSQL schema (skipped without a server)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return str(request.getfixturevalue("postgres_url"))


# --- Registry server (issue 3) --------------------------------------------------------------------------------------


@pytest.fixture
def registry(sql_url: str) -> Iterator[object]:
    """A live registry (services.registry.testing.RegistryHarness) on 127.0.0.1:0, on every database of sql_url."""
    from services.registry.testing import RegistryHarness

    harness = RegistryHarness(sql_url).start()
    try:
        yield harness
    finally:
        harness.stop(grace_s=1.0)
