"""PollRound assigns only devices the registry knows as online, at most devices-per-round, one per device per round."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from raffm.profile import DeviceProfile
from raffm.v1 import aggregator_pb2, registry_pb2
from services.aggregator.devices import CachingDirectory, DeviceInfo, StaticDirectory
from tests.integration.fedloop import Fleet, tiny_bert_folder, tiny_job


def _poll_as_operator(fleet: Fleet, device_id: str) -> aggregator_pb2.PollReply:
    return fleet.agg_stub().PollRound(aggregator_pb2.PollRequest(device_id=device_id), metadata=fleet.operator,
                                      timeout=30)


def _registry_calls(fleet: Fleet, method: str) -> float:
    return fleet.registry.metrics.get_sample_value(
        "raffm_grpc_server_handled_total",
        {"grpc_service": "raffm.v1.RegistryService", "grpc_method": method, "grpc_code": "OK"}) or 0.0


def test_only_online_registered_devices_get_assignments(tmp_path: Path) -> None:
    job = tiny_job(tiny_bert_folder(tmp_path / "model"), clients_per_round=2, quorum=1, rounds=1)
    fleet = Fleet(tmp_path, job, device_cache_s=0.0).start()
    try:
        names = ("a", "b", "late", "quiet", "gone")
        devs = {n: fleet.register(n, train_memory_mb=1000, tier="laptop") for n in names}
        reg = fleet.registry
        # "quiet" misses its heartbeats: the registry's liveness window (60 s) passes; the others heartbeat.
        reg.clock.advance(120)
        for n in ("a", "b", "late", "gone"):
            reg.stub.Heartbeat(registry_pb2.HeartbeatRequest(device_id=devs[n].device_id), metadata=devs[n].md)
        reg.stub.Deregister(registry_pb2.DeregisterRequest(device_id=devs["gone"].device_id), metadata=reg.operator)

        gone = _poll_as_operator(fleet, devs["gone"].device_id)
        assert gone.WhichOneof("action") == "wait" and "deregistered" in gone.wait.reason, gone
        quiet = fleet.poll(fleet.agg_stub(), devs["quiet"])
        assert quiet.WhichOneof("action") == "wait" and "offline" in quiet.wait.reason, quiet

        stub = fleet.agg_stub()
        first = fleet.poll(stub, devs["a"])
        assert first.WhichOneof("action") == "assignment"
        # Polls are idempotent: a device that lost the reply polls again and gets the same assignment, not a second.
        again = fleet.poll(stub, devs["a"])
        assert again.WhichOneof("action") == "assignment" and again.assignment.ticket == first.assignment.ticket
        assert fleet.poll(stub, devs["b"]).WhichOneof("action") == "assignment"
        lookups = _registry_calls(fleet, "GetDevice")
        for _ in range(3):
            full = fleet.poll(stub, devs["late"])  # devices-per-round is 2
            assert full.WhichOneof("action") == "wait" and "full" in full.wait.reason
        # A wait that does not depend on the device costs the registry no lookup (the device cache is off here).
        assert _registry_calls(fleet, "GetDevice") == lookups
        # ... nor waits for the coordinator's lock, which a round's uploads hold while they commit.
        assert fleet.aggregator is not None
        with fleet.aggregator.coordinator._lock:
            held = stub.PollRound(aggregator_pb2.PollRequest(device_id=devs["late"].device_id),
                                  metadata=devs["late"].md, timeout=5)
        assert held.WhichOneof("action") == "wait" and "full" in held.wait.reason

        # The quiet device heartbeats again: it is online, but the round is full; nobody got two assignments.
        reg.stub.Heartbeat(registry_pb2.HeartbeatRequest(device_id=devs["quiet"].device_id), metadata=devs["quiet"].md)
        back = fleet.poll(stub, devs["quiet"])
        assert back.WhichOneof("action") == "wait" and "full" in back.wait.reason
        rnd = stub.GetRound(aggregator_pb2.GetRoundRequest(round_id=first.assignment.round_id),
                            metadata=fleet.operator, timeout=10)
        assert rnd.assigned == 2
        with pytest.raises(grpc.RpcError) as err:  # never registered: the caller's mistake, not a wait
            _poll_as_operator(fleet, "no-such-device")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "not registered" in err.value.details()
    finally:
        fleet.stop()


def test_the_registry_answer_is_cached_briefly() -> None:
    now = [0.0]
    inner = StaticDirectory({"d1": DeviceInfo("d1", DeviceProfile(100, 1, 1, 1))})
    calls: list[str] = []

    class Counting:
        async def get(self, device_id: str) -> DeviceInfo | None:
            calls.append(device_id)
            await asyncio.sleep(0)
            return await inner.get(device_id)

    cache = CachingDirectory(Counting(), ttl_s=2.0, clock=lambda: now[0])

    async def scenario() -> None:
        infos = await asyncio.gather(*(cache.get("d1") for _ in range(5)))  # concurrent polls: one lookup
        assert all(i is not None and i.online for i in infos) and calls == ["d1"]
        inner.set(DeviceInfo("d1", DeviceProfile(100, 1, 1, 1), online=False))
        now[0] = 1.9
        assert (await cache.get("d1")).online and calls == ["d1"]  # type: ignore[union-attr]
        now[0] = 2.1  # expired: the registry is asked again and the device is now offline
        info = await cache.get("d1")
        assert info is not None and not info.online and info.state == "offline" and calls == ["d1", "d1"]
        assert await cache.get("nobody") is None and await cache.get("nobody") is None
        assert calls.count("nobody") == 1  # unknown devices are cached too

    asyncio.run(scenario())


def test_a_device_being_fitted_holds_its_seat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a device is fitted for the round's last seat, the others are told the round is full instead of all
    running the fit for it (at round start a thousand polls did), and a failed fit gives the seat back."""
    import threading

    job = tiny_job(tiny_bert_folder(tmp_path / "model"), clients_per_round=1, quorum=1, rounds=1)
    fleet = Fleet(tmp_path, job).start()
    try:
        a, b = (fleet.register(n, train_memory_mb=1000, tier="laptop") for n in ("a", "b"))
        assert fleet.aggregator is not None
        planner = fleet.aggregator.coordinator.assigner.planner
        real, fits = planner.plan, []
        entered, release = threading.Event(), threading.Event()

        def held_fit(profile, plan_job, version):
            fits.append(profile)
            entered.set()
            assert release.wait(30)
            if len(fits) == 1:
                raise RuntimeError("the first fit fails")
            return real(profile, plan_job, version)

        monkeypatch.setattr(planner, "plan", held_fit)
        stub = fleet.agg_stub()
        first = threading.Thread(target=lambda: pytest.raises(grpc.RpcError, fleet.poll, stub, a))
        first.start()
        assert entered.wait(30)
        full = fleet.poll(stub, b)  # a holds the only seat while it is fitted
        assert full.WhichOneof("action") == "wait" and "full" in full.wait.reason and len(fits) == 1
        release.set()
        first.join(30)
        assert not first.is_alive()
        again = fleet.poll(stub, b)  # a's fit failed: its seat is free again
        assert again.WhichOneof("action") == "assignment" and len(fits) == 2
    finally:
        release.set()
        fleet.stop()
