"""Registry RPC throughput: Heartbeat (a write) and GetDevice (a poll-style read), on SQLite and PostgreSQL.

The registry runs as its own process (`raffm registry serve`) on loopback; this process drives it with
``--concurrency`` concurrent grpc.aio calls for ``--seconds`` per measurement. The baseline, measured in the same
run against the same server, is the grpc.health.v1 Check RPC (same chassis, no token, no database), so the ratio
shows what authentication plus the database cost.

    .venv/bin/python bench/bench_registry.py [--concurrency 16] [--seconds 3] [--rounds 3] [--postgres-url URL]

PostgreSQL is measured when --postgres-url or RAFFM_TEST_POSTGRES_URL is given (a throw-away database is created
on that server and dropped afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raffm.v1 import common_pb2, registry_pb2, registry_pb2_grpc  # noqa: E402
from services.common.testing import postgres_database  # noqa: E402

KEY, OPERATOR = "bench-enroll-key", "bench-operator-token"
SERVING = re.compile(r"serving .* on 127\.0\.0\.1:(\d+)")


@dataclass(frozen=True)
class Result:
    backend: str
    rpc: str
    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


@contextmanager
def registry_process(db_url: str, log_dir: Path, extra_args: tuple[str, ...] = ()) -> Iterator[int]:
    """A `raffm registry serve` child on a free loopback port; yields the port."""
    log_path = log_dir / f"registry-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raffm_app", "registry", "serve", "--db", db_url, "--port", "0",
             "--metrics-port", "-1", "--enroll-key", KEY, "--operator-token", OPERATOR, "--grace-s", "1", *extra_args],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        try:
            deadline = time.monotonic() + 60
            while not (match := SERVING.search(log_path.read_text())):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"registry did not start:\n{log_path.read_text()}")
                time.sleep(0.05)
            yield int(match.group(1))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def sqlite_database(directory: Path) -> Iterator[str]:
    """A fresh SQLite file (the registry's default backend)."""
    yield f"sqlite:///{directory / f'registry-{uuid.uuid4().hex[:6]}.db'}"


async def drive(call: Callable[[int], Awaitable[object]], concurrency: int, seconds: float) -> tuple[int, list[float]]:
    """Run ``call(i)`` from ``concurrency`` workers until ``seconds`` pass; returns (calls, latencies)."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        i = w
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t0)
            i += concurrency

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return len(latencies), latencies


def summarize(backend: str, rpc: str, calls: int, latencies: list[float], seconds: float) -> Result:
    qs = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return Result(backend, rpc, calls, seconds, qs[49] * 1000, qs[98] * 1000)


async def measure(
    backend: str, port: int, devices: int, concurrency: int, seconds: float, rounds: int = 1
) -> list[Result]:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        profile = common_pb2.DeviceProfile(train_memory_mb=2048, gflops=20, up_mbps=10, down_mbps=50, tier="phone")
        regs = await asyncio.gather(*(stub.Register(registry_pb2.RegisterRequest(
            enroll_key=KEY, name=f"bench-{i}", profile=profile), timeout=60) for i in range(devices)))
        creds = [(r.device_id, (("authorization", f"Bearer {r.token}"),)) for r in regs]

        async def check(i: int) -> object:
            return await health.Check(health_pb2.HealthCheckRequest(), timeout=30)

        async def heartbeat(i: int) -> object:
            device_id, md = creds[i % devices]
            return await stub.Heartbeat(registry_pb2.HeartbeatRequest(device_id=device_id), metadata=md, timeout=30)

        async def get_device(i: int) -> object:
            device_id, md = creds[i % devices]
            return await stub.GetDevice(registry_pb2.GetDeviceRequest(device_id=device_id), metadata=md, timeout=30)

        rpcs = (("health.Check (baseline)", check), ("Heartbeat", heartbeat), ("GetDevice", get_device))
        for _, call in rpcs:
            await drive(call, concurrency, min(0.5, seconds))  # warm-up: connections, caches, JIT-free but fair
        # Rounds interleave the RPCs, so load from other processes on a shared machine falls on all of them alike.
        totals: dict[str, tuple[int, list[float]]] = {name: (0, []) for name, _ in rpcs}
        for _ in range(rounds):
            for name, call in rpcs:
                calls, latencies = await drive(call, concurrency, seconds)
                total, all_latencies = totals[name]
                totals[name] = (total + calls, all_latencies + latencies)
        return [summarize(backend, name, calls, latencies, seconds * rounds)
                for name, (calls, latencies) in totals.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent in-flight RPCs (default: 16)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement (default: 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the three measurements; rates are over all rounds (default: 3)")
    parser.add_argument("--token-cache-ttl-s", type=float, default=None,
                        help="the registry's --token-cache-ttl-s (default: the server's, 5 s); 0 verifies every "
                             "token in the database, as a real fleet's heartbeats (every 30 s) do")
    parser.add_argument("--devices", type=int, default=64, help="registered devices the calls rotate over")
    parser.add_argument("--postgres-url", default=os.environ.get("RAFFM_TEST_POSTGRES_URL", ""),
                        help="PostgreSQL server URL (default: $RAFFM_TEST_POSTGRES_URL; empty skips PostgreSQL)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.seconds <= 0 or args.devices < 1 or args.rounds < 1:
        parser.error("--concurrency, --seconds, --devices and --rounds must be positive")

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="raffm-bench-") as tmp:
        backends = [("sqlite", sqlite_database(Path(tmp)))]
        if args.postgres_url:
            backends.append(("postgresql", postgres_database(args.postgres_url, prefix="raffm_bench")))
        for backend, database in backends:
            server_args = () if args.token_cache_ttl_s is None else (
                "--token-cache-ttl-s", str(args.token_cache_ttl_s))
            with database as db_url, registry_process(db_url, Path(tmp), server_args) as port:
                results += asyncio.run(measure(backend, port, args.devices, args.concurrency, args.seconds,
                                               args.rounds))

    print(f"registry RPC throughput: {os.cpu_count()} CPU(s), concurrency {args.concurrency}, "
          f"{args.seconds:g} s per measurement x {args.rounds} interleaved round(s), {args.devices} devices, "
          f"server and client in separate processes"
          + ("" if args.token_cache_ttl_s is None else f", registry token cache {args.token_cache_ttl_s:g} s"))
    print(f"{'backend':<11} {'rpc':<24} {'calls':>7} {'RPC/s':>8} {'vs baseline':>11} {'p50 ms':>7} {'p99 ms':>7}")
    for r in results:
        baseline = next(b.rate for b in results if b.backend == r.backend and b.rpc.startswith("health"))
        print(f"{r.backend:<11} {r.rpc:<24} {r.calls:>7} {r.rate:>8.0f} {r.rate / baseline:>10.2f}x "
              f"{r.p50_ms:>7.2f} {r.p99_ms:>7.2f}")
    if not args.postgres_url:
        print("(PostgreSQL not measured: pass --postgres-url or set RAFFM_TEST_POSTGRES_URL)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
