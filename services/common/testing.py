"""Helpers for tests and benchmarks of the services: an event loop in a thread, a controllable clock, and
throw-away PostgreSQL databases."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread, so synchronous code (tests, sync gRPC clients) can host
    grpc.aio servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="loop-thread", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class FakeClock:
    """A UTC clock that only moves when told to; thread-safe."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


@contextmanager
def postgres_database(server_url: str, prefix: str = "raffm") -> Iterator[str]:
    """A database created on the PostgreSQL server at ``server_url`` for the block, dropped afterwards; yields its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# Credentials a local S3-compatible test server accepts (moto accepts any; these are never real).
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "raffm-test", "AWS_SECRET_ACCESS_KEY": "raffm-test-secret",
               "AWS_REGION": "us-east-1"}


class S3Server:
    """A real S3-compatible server process on 127.0.0.1 (moto's server mode, ``moto[server]`` from the package
    index): ``endpoint`` is its URL, ``env`` the credentials to give clients; :meth:`create_bucket` makes a bucket."""

    def __init__(self, endpoint: str, proc: Any) -> None:
        self.endpoint, self.proc = endpoint, proc
        self.env = dict(S3_TEST_ENV)

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env["AWS_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"raffm-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def s3_server_available() -> str:
    """'' when an S3 test server can be started here, else why not."""
    import importlib.util

    for module in ("moto", "flask", "boto3"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (the test extra installs moto[server] and boto3: pip install -e '.[test]')"
    return ""


@contextmanager
def s3_server(log_path: str | None = None, timeout_s: float = 60.0) -> Iterator[S3Server]:
    """Start an S3-compatible server process on a free loopback port for the block, and stop it afterwards."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    why = s3_server_available()
    if why:
        raise RuntimeError(why)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **S3_TEST_ENV))
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the S3 test server exited with {proc.returncode}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the S3 test server did not answer on {endpoint} within {timeout_s}s") from None
                time.sleep(0.1)
        yield S3Server(endpoint, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            log.close()  # type: ignore[union-attr]
