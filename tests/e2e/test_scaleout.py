"""End to end on "separate hosts": registry, two extractor replicas and the aggregator as separate processes, each
in its own working directory with nothing shared but PostgreSQL (registry and aggregator) and an S3-compatible object
store (model versions); the extractors sit behind one address (a TCP load balancer, as a Kubernetes Service). A
simulated fleet completes every round while one extractor is killed with SIGKILL after the first."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from raffm.v1 import aggregator_pb2, aggregator_pb2_grpc
from raffm_app.processes import free_port
from tests.e2e.balancer import TcpBalancer

SECRETS = {"RAFFM_OPERATOR_TOKEN": "e2e-operator-token", "RAFFM_TICKET_SECRET": "e2e-ticket-secret-0123456789",
           "RAFFM_ENROLL_KEY": "e2e-enroll-key", "RAFFM_AGENT_ENROLL_KEY": "e2e-enroll-key"}
TIERS = """
[tiers.phone]
memory_mb = 2000
gflops = 10
up_mbps = 20
down_mbps = 80
tier = "phone"

[tiers.laptop]
memory_mb = 4000
gflops = 50
up_mbps = 50
down_mbps = 200
tier = "laptop"
"""
ROUNDS, DEVICES = 3, 3


class Hosts:
    """Processes, each in its own directory (its "host"), with its own log."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self, name: str, *args: str) -> None:
        log = self.dir(name) / f"{name}.log"
        with log.open("wb") as handle:
            proc = subprocess.Popen([sys.executable, "-m", "raffm_app", *args], cwd=self.dir(name), env=self.env,
                                    stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = (proc, log)

    def log(self, name: str) -> str:
        return self.procs[name][1].read_text(errors="replace")

    def check(self, *, allow_exit: tuple[str, ...] = ()) -> None:
        for name, (proc, _) in self.procs.items():
            code = proc.poll()
            if code is not None and name not in allow_exit:
                raise AssertionError(f"{name} exited with {code}:\n{self.log(name)[-3000:]}")

    def kill(self, name: str) -> None:
        proc, _ = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait(predicate: Any, what: str, hosts: Hosts, timeout: float = 240.0, **check: Any) -> Any:
    end = time.monotonic() + timeout
    while True:
        hosts.check(**check)
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _serving(address: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _downloads(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("raffm_extractor_downloads_total{"))


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(600)
def test_rounds_complete_on_separate_hosts_while_an_extractor_is_killed(
        tmp_path: Path, tiny_model: Path, postgres_url: str, s3_server: Any) -> None:
    bucket = s3_server.create_bucket()
    env = dict(os.environ, **s3_server.env, **SECRETS, RAFFM_STORE_ENDPOINT=s3_server.endpoint)
    hosts = Hosts(tmp_path / "hosts", env)
    ports = {name: free_port() for name in ("registry", "extractor-a", "extractor-b", "aggregator")}
    metrics = {name: free_port() for name in ("extractor-a", "extractor-b")}
    addr = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    store = f"s3://{bucket}/raffm"
    balancer = TcpBalancer([ports["extractor-a"], ports["extractor-b"]]).start()
    common = ("--grace-s", "1", "--log-level", "INFO")
    try:
        hosts.start("registry", "registry", "serve", "--db", postgres_url, "--port", str(ports["registry"]),
                    "--metrics-port", "-1", *common)
        _wait(lambda: _serving(addr["registry"]), "the registry", hosts)
        model = shutil.copytree(tiny_model, hosts.dir("aggregator") / "model")
        hosts.start("aggregator", "aggregator", "serve", "--db", postgres_url, "--store", store,
                    "--data-dir", "data", "--registry", addr["registry"], "--extractor", balancer.address,
                    "--port", str(ports["aggregator"]), "--metrics-port", "-1", "--model", str(model),
                    "--num-labels", "2", "--rounds", str(ROUNDS), "--clients-per-round", str(DEVICES),
                    "--quorum", str(DEVICES), "--min-updates", "2", "--round-deadline-s", "90",
                    "--local-steps", "1", "--batch-size", "4", "--seq-len", "16", "--poll-wait-s", "0.2", *common)
        _wait(lambda: _serving(addr["aggregator"]), "the aggregator (version 0 written to the bucket)", hosts)
        for name in ("extractor-a", "extractor-b"):
            hosts.start(name, "extractor", "serve", "--store", store, "--registry", addr["registry"],
                        "--port", str(ports[name]), "--metrics-port", str(metrics[name]), *common)
        for name in ("extractor-a", "extractor-b"):
            _wait(lambda: _serving(addr[name]), name, hosts)  # noqa: B023 - called at once

        fleet = hosts.dir("devices")
        shutil.copytree(tiny_model, fleet / "model")
        (fleet / "tiers.toml").write_text(TIERS)
        (fleet / "data.jsonl").write_text("".join(
            f'{{"text": "review number {i} was {"great" if i % 2 else "dull"}", "label": {i % 2}}}\n'
            for i in range(60)))
        hosts.start("devices", "agent", "simulate", "--devices", str(DEVICES), "--tiers", "tiers.toml",
                    "--data", "data.jsonl", "--mode", "threads", "--state-root", "state", "--model", "model",
                    "--registry", addr["registry"], "--aggregator", addr["aggregator"],
                    "--extractor", balancer.address, "--max-rounds", str(ROUNDS), "--log-format", "text")

        channel = grpc.insecure_channel(addr["aggregator"])
        stub = aggregator_pb2_grpc.AggregatorServiceStub(channel)
        operator = (("authorization", f"Bearer {SECRETS['RAFFM_OPERATOR_TOKEN']}"),)

        def closed() -> list[Any]:
            reply = stub.ListRounds(aggregator_pb2.ListRoundsRequest(), metadata=operator, timeout=10)
            return [r for r in reply.rounds if r.state == aggregator_pb2.ROUND_STATE_CLOSED]

        _wait(lambda: len(closed()) >= 1, "round 1", hosts, allow_exit=("devices",))
        served = {name: _downloads(metrics[name]) for name in metrics}
        assert all(served.values()), f"both replicas serve behind one address: {served}"
        hosts.kill("extractor-a")
        _wait(lambda: len(closed()) == ROUNDS, f"all {ROUNDS} rounds", hosts, allow_exit=("devices", "extractor-a"))
        _wait(lambda: hosts.procs["devices"][0].poll() is not None, "the fleet to finish", hosts,
              allow_exit=("devices", "extractor-a"))
        assert hosts.procs["devices"][0].returncode == 0, hosts.log("devices")[-3000:]

        rounds = sorted(closed(), key=lambda r: r.index)
        assert [r.result_model_version for r in rounds] == [f"job-v{i}" for i in range(1, ROUNDS + 1)]
        assert all(r.accepted >= 2 for r in rounds) and sum(r.accepted for r in rounds) >= ROUNDS * DEVICES - 1
        assert _downloads(metrics["extractor-b"]) > served["extractor-b"]  # the survivor served the later rounds
        job = stub.GetJob(aggregator_pb2.GetJobRequest(), metadata=operator, timeout=10)
        assert job.state == aggregator_pb2.JOB_STATE_COMPLETED and job.model_version == f"job-v{ROUNDS}"

        # Nothing shared on disk: no checkpoint blob or index anywhere, the versions are in the bucket (the aggregator's
        # server_state holds its private momentum buffer, which no other service reads).
        blobs = [p for p in tmp_path.rglob("*.safetensors") if p.parent.name not in ("model", "server_state")]
        assert not blobs and not list(tmp_path.rglob("index.json"))
        keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
        assert sum(k.startswith("raffm/versions/") for k in keys) == ROUNDS + 1
        for name in ("extractor-a", "extractor-b", "registry"):
            assert sorted(p.name for p in hosts.dir(name).iterdir()) == [f"{name}.log"], name
    except BaseException:
        for name in hosts.procs:
            print(f"----- {name}\n{hosts.log(name)[-4000:]}", file=sys.stderr)
        raise
    finally:
        hosts.stop()
        balancer.stop()
