"""The registry's revocation feed (WatchRevocations): the aggregator's and extractor's verifier reuses the registry's
answers for a minute while the feed is live, forgets a device's the moment the registry revokes it, and goes back to
short reuse when the feed is lost. Real registry, real sockets."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from raffm.errors import UnavailableError
from raffm.v1 import registry_pb2, registry_pb2_grpc
from services.common.auth import FEED_TOKEN_CACHE_S, FleetVerifier, auth_metadata, fleet_verifier
from services.common.testing import LoopThread
from services.registry.revocations import RevocationFeed
from services.registry.testing import OPERATOR_TOKEN, RegistryHarness


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


def verify_token_calls(registry: RegistryHarness) -> float:
    """VerifyToken calls the registry answered so far (its own RPC counter)."""
    return sum(s.value for metric in registry.metrics.collect() if metric.name == "raffm_grpc_server_handled"
               for s in metric.samples if s.name.endswith("_total") and s.labels["grpc_method"] == "VerifyToken")


@pytest.fixture
def registry(tmp_path) -> Iterator[RegistryHarness]:
    harness = RegistryHarness(f"sqlite:///{tmp_path / 'registry.db'}").start()
    yield harness
    if harness.app is not None:
        harness.stop()


@pytest.fixture
def watching(registry: RegistryHarness) -> Iterator[tuple[LoopThread, FleetVerifier]]:
    """The verifier the aggregator and extractor build, with its feed started as their servers start it."""
    loop = LoopThread()

    async def build() -> FleetVerifier:
        verifier = fleet_verifier(registry.address, OPERATOR_TOKEN)
        await verifier.start()
        return verifier

    verifier = loop.run(build())
    assert verifier.watcher is not None
    yield loop, verifier
    loop.run(verifier.close())
    loop.close()


def checked_device(registry: RegistryHarness, loop: LoopThread, verifier: FleetVerifier) -> Any:
    """A new device whose token the verifier checked while the feed was live."""
    watcher = verifier.watcher
    assert watcher is not None
    wait_for(lambda: watcher.live)
    device = registry.register("phone-1")
    assert loop.run(verifier.verify(device.token)).subject == device.device_id
    return device


def test_a_deregistered_device_is_refused_at_once_though_answers_are_reused_for_a_minute(registry, watching):
    loop, verifier = watching
    device = checked_device(registry, loop, verifier)
    assert registry.metrics.get_sample_value("raffm_registry_revocation_watchers") == 1  # what ops see
    asked = verify_token_calls(registry)
    for _ in range(5):
        assert loop.run(verifier.verify(device.token)).subject == device.device_id
    assert verify_token_calls(registry) == asked  # reused, not asked again

    registry.stub.Deregister(registry_pb2.DeregisterRequest(device_id=device.device_id),
                             metadata=auth_metadata(device.token), timeout=10)
    # Without the feed the answer above would be reused for FEED_TOKEN_CACHE_S more seconds.
    wait_for(lambda: loop.run(verifier.verify(device.token)) is None, timeout_s=FEED_TOKEN_CACHE_S / 10)


def test_a_watcher_stops_and_starts_with_its_server_and_without_the_feed_nothing_is_reused(registry, watching):
    loop, verifier = watching
    device = checked_device(registry, loop, verifier)
    assert verifier.watcher is not None

    loop.run(verifier.close())  # as when its server stops
    assert not verifier.watcher.live
    wait_for(lambda: registry.metrics.get_sample_value("raffm_registry_revocation_watchers") == 0)
    loop.run(verifier.start())
    wait_for(lambda: verifier.watcher is not None and verifier.watcher.live)  # back when it starts again
    assert loop.run(verifier.verify(device.token)).subject == device.device_id  # kept for a minute from here

    registry.stop()
    wait_for(lambda: not verifier.watcher.live)
    # The registry is gone: the answer cached while the feed was live is no longer used.
    with pytest.raises(UnavailableError):
        loop.run(verifier.verify(device.token))


def test_the_feed_ends_cleanly_when_the_registry_stops_and_is_for_operators_only(registry):
    device = registry.register("phone-1")
    with pytest.raises(grpc.RpcError) as denied:
        next(registry.stub.WatchRevocations(registry_pb2.WatchRevocationsRequest(),
                                            metadata=auth_metadata(device.token), timeout=10))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    channel = grpc.insecure_channel(registry.address)  # the harness closes its own channel when it stops
    call = registry_pb2_grpc.RegistryServiceStub(channel).WatchRevocations(registry_pb2.WatchRevocationsRequest(),
                                                                           metadata=registry.operator, timeout=60)
    assert next(call).synced
    registry.stub.Deregister(registry_pb2.DeregisterRequest(device_id=device.device_id), metadata=registry.operator,
                             timeout=10)
    event = next(call)
    assert event.device_id == device.device_id and not event.synced
    stopper = threading.Thread(target=registry.stop, kwargs={"grace_s": 30})
    stopper.start()
    assert list(call) == []  # ended by the registry, not cut off when its grace period ran out
    assert call.code() == grpc.StatusCode.OK
    stopper.join()
    channel.close()


def test_a_watcher_that_falls_behind_is_dropped():
    async def scenario() -> None:
        feed = RevocationFeed(backlog=2)
        stream = feed.watch()
        assert await anext(stream) is None  # synced
        for device in ("a", "b", "c"):
            feed.publish(device)
        assert feed.watchers == 0
        assert [d async for d in stream] == ["a", "b"]  # then the stream ends: the watcher must resync

    asyncio.run(scenario())
