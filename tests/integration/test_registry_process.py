"""`raffm registry serve` as a real process: /metrics (checked by promtool when installed) and SIGTERM shutdown."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raffm.v1 import registry_pb2, registry_pb2_grpc
from raffm_app.processes import ProcessFailed, ProcessGroup, raffm_command, serve_on_free_ports, wait_serving
from services.common.auth import auth_metadata
from services.registry.testing import make_profile

KEY, OPERATOR = "process-test-enroll-key", "process-test-operator-token"


@pytest.fixture
def served(tmp_path: Path):
    """A `raffm registry serve` child process on ports it picks itself (as the demo starts it); yields (process, grpc
    port, metrics port, log path). A port file left by an earlier run is there before it starts: it must not be read."""
    group = ProcessGroup(tmp_path, grace_s=5)  # its log beside the database
    group.port_file("registry").write_text('{"grpc": 1, "metrics": 2}')
    group.start("registry", raffm_command(
        "registry", "serve", "--data-dir", str(tmp_path), *serve_on_free_ports(group, "registry"), "--grace-s", "5",
        "--liveness-window-s", "30"), dict(os.environ, RAFFM_ENROLL_KEY=KEY, RAFFM_OPERATOR_TOKEN=OPERATOR))
    try:
        ports = wait_serving(group, "registry", timeout_s=60)
        proc, log_path, _ = group.procs["registry"]
        yield proc, ports["grpc"], ports["metrics"], log_path
    finally:
        group.stop()


def test_a_service_that_cannot_start_is_reported_with_the_end_of_its_log(tmp_path: Path) -> None:
    """Where nobody can open the log (a CI run), the error itself must say why the service stopped."""
    group = ProcessGroup(tmp_path / "logs", grace_s=5)
    env = {k: v for k, v in os.environ.items() if k != "RAFFM_ENROLL_KEY"}
    group.start("registry", raffm_command("registry", "serve", "--data-dir", str(tmp_path),
                                          *serve_on_free_ports(group, "registry")), env)
    try:
        quoted = r"(?s)registry exited with code 2; .*\n  \| raffm registry: error: --enroll-key"
        with pytest.raises(ProcessFailed, match=quoted) as failed:
            wait_serving(group, "registry", timeout_s=60)
    finally:
        group.stop()
    assert failed.value.log == tmp_path / "logs" / "registry.log"


def test_sigterm_drains_and_exits_cleanly(served):
    proc, port, _, log_path = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    assert (Path(log_path).parent / "registry.db").exists()  # default database under --data-dir
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "draining" in log_path.read_text() and "stopped" in log_path.read_text()


def test_the_registry_process_never_loads_torch(served):
    """The registry needs no tensors: a process that maps libtorch starts several times slower and holds several
    times the memory (a thousand-device fleet's registry replicas, a pod's cold start)."""
    proc, port, _, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # past start-up, one request served
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        stub.Register(registry_pb2.RegisterRequest(enroll_key=KEY, name="t1", profile=make_profile()), timeout=10)
    maps = Path(f"/proc/{proc.pid}/maps")
    if not maps.exists():
        pytest.skip("needs /proc (Linux) to list the libraries a process has mapped")
    assert "libtorch" not in maps.read_text()


def test_metrics_endpoint_serves_rpc_and_device_metrics(served):
    _, port, metrics_port, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        reply = stub.Register(registry_pb2.RegisterRequest(enroll_key=KEY, name="m1", profile=make_profile(
            tier="phone")), timeout=10)
        stub.Heartbeat(registry_pb2.HeartbeatRequest(device_id=reply.device_id),
                       metadata=auth_metadata(reply.token), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.ListDevices(registry_pb2.ListDevicesRequest(), metadata=auth_metadata("wrong"), timeout=10)
        stub.ListDevices(registry_pb2.ListDevicesRequest(), metadata=auth_metadata(OPERATOR), timeout=10)
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for needle in (
        'raffm_grpc_server_handled_total{grpc_code="OK",grpc_method="Register",grpc_service="raffm.v1.RegistryService"}',
        'grpc_code="UNAUTHENTICATED",grpc_method="ListDevices"',
        'raffm_grpc_server_handling_seconds_bucket{',
        'raffm_registry_devices{state="online",tier="phone"} 1.0',
        'raffm_registry_registrations_total{result="created"} 1.0',
    ):
        assert needle in text, needle
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian package `prometheus`); metric names not linted")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr
