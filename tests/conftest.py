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


# --- Object store and Ray (issue 16) --------------------------------------------------------------------------------
# `s3_server` is a real S3-compatible server process (moto's server mode, from the test extra) on a free loopback port
# for the session; `s3_url` is an s3:// checkpoint store URL in a fresh bucket. Optional servers and engines skip with
# their reason when absent, unless RAFFM_TEST_REQUIRE names them (.ci/run sets "s3,ray"): then absence fails.

REQUIRE_ENV = "RAFFM_TEST_REQUIRE"


def skip_or_fail(what: str, why: str) -> None:
    """Skip a test whose optional dependency ``what`` is absent, or fail when RAFFM_TEST_REQUIRE names it."""
    required = {w.strip() for w in os.environ.get(REQUIRE_ENV, "").split(",") if w.strip()}
    if what in required:
        pytest.fail(f"{what} is required here ({REQUIRE_ENV}={os.environ[REQUIRE_ENV]}) but unavailable: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A services.common.testing.S3Server for the session; its credentials are in os.environ meanwhile."""
    from services.common.testing import s3_server as start, s3_server_available

    why = s3_server_available()
    if why:
        skip_or_fail("s3", why)
    log = tmp_path_factory.mktemp("s3") / "s3-server.log"
    with start(str(log)) as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def s3_url(s3_server: object) -> str:
    """``s3://<fresh bucket>/checkpoints?endpoint=<the test server>``."""
    bucket = s3_server.create_bucket()  # type: ignore[attr-defined]
    return f"s3://{bucket}/checkpoints?endpoint={s3_server.endpoint}"  # type: ignore[attr-defined]
