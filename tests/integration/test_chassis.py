"""The service chassis on a real grpc.aio server: auth, error table, metrics, limits, graceful shutdown, bind policy."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from prometheus_client import CollectorRegistry

from raffm.errors import (
    AuthenticationError, ConfigError, ConflictError, NotFoundError, PermissionDeniedError, PreconditionError, ValidationError,
)
from services.common.auth import Principal, StaticTokenVerifier, auth_metadata, current_principal
from services.common.errors import ERROR_DETAIL_KEY, parse_error_detail
from services.common.server import MiB, ServerConfig, ServiceBinding, build_server
from services.common.testing import LoopThread

SERVICE = "raffm.test.Echo"
OPERATOR = "operator-token"
DEVICE_TOKEN = "device-token"

ERRORS = {
    b"validation": ValidationError("x must be > 0, got -1", field="x"),
    b"auth": AuthenticationError("no"),
    b"denied": PermissionDeniedError("not yours"),
    b"missing": NotFoundError("no such thing"),
    b"precondition": PreconditionError("round closed"),
    b"conflict": ConflictError("another upload of this ticket is in progress"),
    b"value": ValueError("plain library validation"),
    b"bug": RuntimeError("oops"),
}
EXPECTED = {
    b"validation": grpc.StatusCode.INVALID_ARGUMENT, b"auth": grpc.StatusCode.UNAUTHENTICATED,
    b"denied": grpc.StatusCode.PERMISSION_DENIED, b"missing": grpc.StatusCode.NOT_FOUND,
    b"precondition": grpc.StatusCode.FAILED_PRECONDITION, b"conflict": grpc.StatusCode.ABORTED,
    b"value": grpc.StatusCode.INVALID_ARGUMENT,
    b"bug": grpc.StatusCode.INTERNAL,
}


class DeviceVerifier:
    async def verify(self, token: str) -> Principal | None:
        return Principal(subject="dev-1", fleet="default") if token == DEVICE_TOKEN else None


class EchoService:
    """A tiny service exercising every handler shape; bytes in, bytes out."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release: asyncio.Event | None = None

    async def echo(self, request: bytes, context) -> bytes:
        return request

    async def whoami(self, request: bytes, context) -> bytes:
        return current_principal().subject.encode()

    async def fail(self, request: bytes, context) -> bytes:
        if request == b"huge":  # an error that quotes a 10 MB field in its message, hint and field path
            raise ValidationError("value " + "v" * (10 << 20) + " is bad", field="f" * (10 << 20),
                                  hint="h" * (10 << 20))
        raise ERRORS[request]

    async def slow(self, request: bytes, context) -> bytes:
        self.release = asyncio.Event()
        self.entered.set()
        await asyncio.sleep(float(request.decode()))
        return b"finished"

    async def count(self, request: bytes, context):
        for i in range(int(request.decode())):
            yield str(i).encode()
        if request == b"3":
            raise NotFoundError("stream ran out")

    async def total(self, request_iterator, context) -> bytes:
        return str(sum([len(chunk) async for chunk in request_iterator])).encode()

    async def hold(self, request_iterator, context) -> bytes:
        """Read the first message, then nothing until released: what the client got to send meanwhile is what the
        transport buffered for this stream."""
        self.release = asyncio.Event()
        received = len(await anext(aiter(request_iterator)))
        self.entered.set()
        await self.release.wait()
        return str(received + sum([len(chunk) async for chunk in request_iterator])).encode()

    def binding(self) -> ServiceBinding:
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Whoami": grpc.unary_unary_rpc_method_handler(self.whoami),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "Total": grpc.stream_unary_rpc_method_handler(self.total),
            "Hold": grpc.stream_unary_rpc_method_handler(self.hold),
        }
        generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
        return ServiceBinding(SERVICE, lambda server: server.add_generic_rpc_handlers((generic,)),
                              frozenset({f"/{SERVICE}/Echo"}))


class Chassis:
    def __init__(self, config: ServerConfig) -> None:
        self.loop = LoopThread()
        self.service = EchoService()
        self.metrics = CollectorRegistry()
        from services.common.auth import ChainedTokenVerifier

        verifier = ChainedTokenVerifier([StaticTokenVerifier({"ops": OPERATOR}), DeviceVerifier()])

        async def build():
            server = build_server(config, [self.service.binding()], verifier=verifier, registry=self.metrics)
            await server.start()
            return server

        self.server = self.loop.run(build())
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.server.port}",
            options=[("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)])

    def call(self, method: str, payload: bytes, token: str | None = DEVICE_TOKEN, timeout: float = 10):
        md = auth_metadata(token) if token else ()
        return self.channel.unary_unary(f"/{SERVICE}/{method}")(payload, metadata=md, timeout=timeout)

    def stop(self, grace: float = 1.0) -> None:
        self.channel.close()
        self.loop.run(self.server.stop(grace))
        self.loop.close()


@pytest.fixture
def chassis():
    c = Chassis(ServerConfig(grace_s=5.0))
    yield c
    c.stop()


def test_public_method_needs_no_token_others_do(chassis):
    assert chassis.call("Echo", b"hi", token=None) == b"hi"
    assert chassis.call("Whoami", b"") == b"dev-1"
    assert chassis.call("Whoami", b"", token=OPERATOR) == b"ops"
    for token in (None, "bogus"):
        with pytest.raises(grpc.RpcError) as err:
            chassis.call("Whoami", b"", token=token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_error_table_maps_domain_errors(chassis, kind):
    with pytest.raises(grpc.RpcError) as err:
        chassis.call("Fail", kind)
    assert err.value.code() == EXPECTED[kind]
    if kind == b"bug":  # internals are not leaked to callers
        assert "oops" not in err.value.details() and "server log" in err.value.details()
        return
    assert str(ERRORS[kind]) in err.value.details()
    detail = parse_error_detail(err.value.trailing_metadata())
    assert detail is not None and detail.reason == type(ERRORS[kind]).__name__
    if kind == b"validation":
        assert detail.field == "x" and "correct the named field" in err.value.details()
    assert ERROR_DETAIL_KEY.endswith("-bin")


def test_an_error_quoting_a_huge_value_keeps_its_code_and_a_short_message(chassis):
    """A status message travels in HTTP/2 trailers: unbounded, the client sees RESOURCE_EXHAUSTED instead."""
    with pytest.raises(grpc.RpcError) as err:
        chassis.call("Fail", b"huge")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()[:200]
    assert err.value.details().startswith("value vvv") and len(err.value.details()) < 2000
    assert "more characters cut" in err.value.details()
    detail = parse_error_detail(err.value.trailing_metadata())
    assert detail is not None and len(detail.message) + len(detail.field) + len(detail.hint) < 2000


def test_streaming_handlers_are_wrapped(chassis):
    count = chassis.channel.unary_stream(f"/{SERVICE}/Count")
    assert list(count(b"2", metadata=auth_metadata(DEVICE_TOKEN))) == [b"0", b"1"]
    with pytest.raises(grpc.RpcError) as err:
        list(count(b"3", metadata=auth_metadata(DEVICE_TOKEN)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        list(count(b"2"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    total = chassis.channel.stream_unary(f"/{SERVICE}/Total")
    assert total(iter([b"ab", b"cde"]), metadata=auth_metadata(DEVICE_TOKEN)) == b"5"


def test_messages_larger_than_grpc_default_limit_pass(chassis):
    payload = bytes(8 * MiB)  # the grpc default receive limit is 4 MiB
    assert len(chassis.call("Echo", payload, token=None)) == len(payload)


def test_rpc_metrics_by_method_and_code(chassis):
    chassis.call("Echo", b"x", token=None)
    chassis.call("Echo", b"x", token=None)
    with pytest.raises(grpc.RpcError):
        chassis.call("Whoami", b"", token="bogus")
    sample = chassis.metrics.get_sample_value
    labels = {"grpc_service": SERVICE, "grpc_method": "Echo", "grpc_code": "OK"}
    assert sample("raffm_grpc_server_handled_total", labels) == 2
    assert sample("raffm_grpc_server_handling_seconds_count", labels) == 2
    assert sample("raffm_grpc_server_handled_total",
                  {"grpc_service": SERVICE, "grpc_method": "Whoami", "grpc_code": "UNAUTHENTICATED"}) == 1


def test_graceful_shutdown_lets_in_flight_calls_finish():
    c = Chassis(ServerConfig(grace_s=10.0))
    try:
        future = c.channel.unary_unary(f"/{SERVICE}/Slow").future(b"0.5", metadata=auth_metadata(DEVICE_TOKEN),
                                                                   timeout=30)
        assert c.service.entered.wait(10)
        stop = c.loop.run(_start_stop(c.server))  # stop begins while Slow is running
        assert future.result() == b"finished"
        c.loop.run(stop)
        with pytest.raises(grpc.RpcError) as err:  # and nothing new is accepted
            c.call("Echo", b"late", token=None, timeout=2)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        c.channel.close()
        c.loop.close()


async def _start_stop(server):
    task = asyncio.create_task(server.stop())
    await asyncio.sleep(0)

    async def wait():
        await task

    return wait()


def test_grace_period_bounds_shutdown():
    c = Chassis(ServerConfig(grace_s=0.2))
    try:
        future = c.channel.unary_unary(f"/{SERVICE}/Slow").future(b"60", metadata=auth_metadata(DEVICE_TOKEN),
                                                                   timeout=60)
        assert c.service.entered.wait(10)
        c.loop.run(c.server.stop(), timeout=30)  # returns long before the 60 s call would end
        with pytest.raises(grpc.RpcError) as err:
            future.result(timeout=30)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    finally:
        c.channel.close()
        c.loop.close()


@pytest.mark.parametrize("window_kib", [128, 16 * 1024])
def test_stream_window_bounds_what_a_stream_buffers_before_the_service_reads_it(window_kib):
    """A service that does not read its stream holds about one window of it, not the whole upload: the memory of N
    concurrent uploads is about N x window (gRPC's default grows the window without a useful bound)."""
    c = Chassis(ServerConfig(stream_window_bytes=window_kib * 1024))
    message, total, sent = 64 * 1024, 64 * MiB, []

    def chunks():
        for _ in range(total // message):
            sent.append(message)
            yield bytes(message)

    try:
        hold = c.channel.stream_unary(f"/{SERVICE}/Hold")
        future = hold.future(chunks(), metadata=auth_metadata(DEVICE_TOKEN), timeout=60)
        assert c.service.entered.wait(10)
        before = -1
        while before != sum(sent):  # until the client can send no more
            before = sum(sent)
            threading.Event().wait(0.3)
        buffered = sum(sent)
        c.loop.loop.call_soon_threadsafe(c.service.release.set)
        assert future.result(timeout=60) == str(total).encode()  # nothing lost while held
    finally:
        c.stop()
    if window_kib == 128:
        assert buffered <= 1 * MiB, f"the client sent {buffered} bytes the service had not read"
    else:
        assert buffered >= 8 * MiB, f"a 16 MiB window let only {buffered} bytes through"


@pytest.mark.parametrize("window", [0, 65_534])
def test_a_stream_window_below_http2s_minimum_is_refused(window):
    loop = LoopThread()
    try:
        async def build():
            return build_server(ServerConfig(stream_window_bytes=window), [], verifier=None)

        with pytest.raises(ConfigError) as err:
            loop.run(build())
        assert "--stream-window-kib" in str(err.value)
    finally:
        loop.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org"])
def test_plaintext_on_non_loopback_is_refused(host):
    loop = LoopThread()
    try:
        async def build():
            return build_server(ServerConfig(host=host), [], verifier=None)

        with pytest.raises(ConfigError) as err:
            loop.run(build())
        assert "--insecure" in str(err.value.hint) and host in str(err.value)
    finally:
        loop.close()


def test_insecure_flag_allows_plaintext_on_all_interfaces():
    loop = LoopThread()
    try:
        async def build_and_stop():
            server = build_server(ServerConfig(host="0.0.0.0", insecure=True), [], verifier=None)
            await server.start()
            port = server.port
            await server.stop(0)
            return port

        assert loop.run(build_and_stop()) > 0
    finally:
        loop.close()
