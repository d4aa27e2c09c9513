"""Large simulated fleets for `raffm agent simulate`: agents as threads of one process or spread over Ray actors,
a control-plane mode that fits a thousand devices on one machine, and the latency every agent observes.

*Control-plane mode* (``--control-plane``): each device gets a tiny synthetic text share instead of a split of a
data set, one torch thread, and no progress output; paired with a job on a tiny model and zero or one local step,
an assignment costs milliseconds, so what is measured is registration, polling, heartbeats, tickets, transfers and
round closing: the control plane. Agents still run the real agent code end to end.

*Ray mode* (``--mode ray``): the devices are split over ``--ray-actors`` actors (default: one per CPU of the
cluster) that Ray places on its nodes; each actor runs its share of agents as threads, so a cluster of N machines
runs N times the devices of one. ``--ray-address`` joins an existing cluster; without it a local instance starts.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_agent.config import AgentConfig
from raffm.memory import shared_process


class Stop(Protocol):
    """A stop request the fleet polls (a ``threading.Event``, or a flag a signal handler sets)."""

    def is_set(self) -> bool: ...


log = logging.getLogger("edge_agent.fleet")

# The calls whose latency a fleet reports (ServiceClient.call's ``what``).
REPORTED_CALLS = ("registry.Register", "aggregator.PollRound", "registry.Heartbeat")


class LatencyRecorder:
    """Thread-safe latencies of the unary calls of many agents, by call (seconds; failed attempts counted apart)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.samples: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}

    def __call__(self, what: str, seconds: float, ok: bool) -> None:
        with self._lock:
            if ok:
                self.samples.setdefault(what, []).append(seconds)
            else:
                self.errors[what] = self.errors.get(what, 0) + 1

    def merge(self, samples: dict[str, list[float]], errors: dict[str, int]) -> None:
        with self._lock:
            for what, values in samples.items():
                self.samples.setdefault(what, []).extend(values)
            for what, n in errors.items():
                self.errors[what] = self.errors.get(what, 0) + n

    def summary(self) -> dict[str, dict[str, float]]:
        """Per call: count, errors, p50/p90/p99/max in milliseconds."""
        out: dict[str, dict[str, float]] = {}
        with self._lock:
            items = {k: sorted(v) for k, v in self.samples.items()}
            errors = dict(self.errors)
        for what in sorted(set(items) | set(errors)):
            values = items.get(what, [])
            row: dict[str, float] = {"count": float(len(values)), "errors": float(errors.get(what, 0))}
            if values:
                row.update(p50_ms=1000 * _quantile(values, 0.50), p90_ms=1000 * _quantile(values, 0.90),
                           p99_ms=1000 * _quantile(values, 0.99), max_ms=1000 * values[-1],
                           mean_ms=1000 * statistics.fmean(values))
            out[what] = row
        return out


def _quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values (nearest rank)."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class AgentReport:
    """What one simulated device did."""

    name: str
    device_id: str
    outcomes: list[str] = field(default_factory=list)
    error: str = ""


@dataclass
class FleetReport:
    """A fleet run: per-device reports and the latencies all agents observed."""

    agents: list[AgentReport]
    latency: dict[str, dict[str, float]]
    seconds: float
    samples: dict[str, list[float]] = field(default_factory=dict)  # seconds, by call (for merging runs)

    @property
    def registered(self) -> int:
        return sum(1 for a in self.agents if a.device_id)

    def outcome_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.agents:
            for o in a.outcomes:
                counts[o] = counts.get(o, 0) + 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"devices": len(self.agents), "registered": self.registered, "outcomes": self.outcome_counts(),
                "latency_ms": self.latency, "seconds": round(self.seconds, 2),
                "errors": [f"{a.name}: {a.error}" for a in self.agents if a.error][:20],
                "samples_ms": {k: [round(1000 * x, 3) for x in v] for k, v in self.samples.items()
                               if k in REPORTED_CALLS}}


def control_plane_share(index: int, examples: int = 8) -> Any:
    """A device's tiny synthetic text share (both labels present) for control-plane runs."""
    from raffm.data import TextDataset

    texts = [f"device {index} review {i}: {'a wonderful film' if i % 2 else 'dull and far too long'}"
             for i in range(examples)]
    return TextDataset(texts, [i % 2 for i in range(examples)], ("rotten", "fresh"))


def run_agent_threads(devices: Sequence[tuple[AgentConfig, Any]], *, duration_s: float = 0.0,
                      stop: Stop | None = None, recorder: LatencyRecorder | None = None,
                      start_spread_s: float = 0.0, control_plane: bool = False) -> list[AgentReport]:
    """Run one agent thread per device until each finishes (``max_rounds``), ``duration_s`` passes (0: no limit)
    or ``stop`` is set; every agent's unary-call latencies go to ``recorder``. ``start_spread_s`` staggers the
    starts evenly (a fleet does not boot in one millisecond).

    ``control_plane``: many agents share this process, so what makes one agent's memory figures exact would cost
    the whole fleet CPU; the fleet runs in a :func:`raffm.memory.shared_process` block (no runtime warm-up, no
    full garbage collections or high-water-mark resets around the rounds; the figures are meaningless with hundreds
    of agents in one process anyway), and everything alive after start-up (the agents, torch, transformers) is
    frozen out of the garbage collector, so the collector's own full collections scan only the rounds' objects."""
    import gc

    from edge_agent.agent import Agent

    agents = [Agent(config, dataset=share) for config, share in devices]
    for a in agents:
        if recorder is not None:
            a.client.observer = recorder
    if control_plane:
        import transformers  # noqa: F401 - imported (and frozen) once, before the agents import it per round
        from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: F401

        gc.collect()
        gc.freeze()
    errors: dict[str, str] = {}

    def run(agent: Agent) -> None:
        try:
            agent.run()
        except Exception as exc:  # noqa: BLE001 - one device's crash is a report, not the fleet's end
            errors[agent.config.name] = f"{type(exc).__name__}: {exc}"

    with shared_process() if control_plane else nullcontext():
        threads = [threading.Thread(target=run, args=(a,), name=f"agent-{a.config.name}", daemon=True)
                   for a in agents]
        started = time.monotonic()
        for i, t in enumerate(threads):
            if start_spread_s and len(threads) > 1:
                delay = started + start_spread_s * i / (len(threads) - 1) - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            t.start()
        deadline = started + duration_s if duration_s > 0 else None
        try:
            while any(t.is_alive() for t in threads):
                if (stop is not None and stop.is_set()) or (deadline is not None and time.monotonic() > deadline):
                    break
                time.sleep(0.2)
        finally:
            for a in agents:
                a.stop("simulation over")
            for t in threads:
                t.join(timeout=30)
    return [AgentReport(a.config.name, a.identity.device_id if a.identity is not None else "",
                        [o.status for o in a.outcomes], errors.get(a.config.name, "")) for a in agents]


class AgentGroup:
    """A Ray actor's body: a share of the fleet as threads in one worker process (see :func:`run_ray`)."""

    def __init__(self, devices: list[tuple[AgentConfig, Any]], log_level: str = "WARNING",
                 control_plane: bool = False) -> None:
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.devices, self.control_plane = devices, control_plane

    def run(self, duration_s: float, start_spread_s: float) -> dict[str, Any]:
        recorder = LatencyRecorder()
        reports = run_agent_threads(self.devices, duration_s=duration_s, recorder=recorder,
                                    start_spread_s=start_spread_s, control_plane=self.control_plane)
        return {"agents": reports, "samples": recorder.samples, "errors": recorder.errors}


def _start_ray(ray: Any, address: str, attempts: int = 3) -> None:
    """``ray.init``, tried again when a local node misses Ray's fixed 30 s wait for its raylet to register (a busy
    machine: Ray then raises a bare ``Exception`` saying the node "timed out during startup")."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=True,
                     logging_level=logging.WARNING)
            return
        except Exception as exc:
            if attempt == attempts or "timed out during startup" not in str(exc):
                raise
            log.warning("Ray's local node did not start in time (attempt %d of %d); starting it again", attempt,
                        attempts)
            ray.shutdown()


def run_ray(devices: Sequence[tuple[AgentConfig, Any]], *, address: str = "", actors: int = 0,
            duration_s: float = 0.0, start_spread_s: float = 0.0, log_level: str = "WARNING",
            control_plane: bool = False) -> FleetReport:
    """The fleet as Ray actors: ``actors`` groups (default: one per CPU Ray sees), each running its devices as
    threads; joins the cluster at ``address`` or starts a local instance (shut down again at the end)."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        # A local head's GCS may need more than Ray's default 30 s to publish its port on a busy machine (the simulator
        # shares it with the services and the fleet); the operator's own setting wins.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
        _start_ray(ray, address)
    t0 = time.monotonic()
    try:
        n = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        n = min(n, len(devices))
        groups = [list(devices[i::n]) for i in range(n)]
        remote = ray.remote(num_cpus=0)(AgentGroup)  # placement is spread by Ray; agents mostly wait on the network
        handles: list[Any] = [remote.options(scheduling_strategy="SPREAD")  # type: ignore[attr-defined]
                              .remote(g, log_level, control_plane) for g in groups]
        results = ray.get([h.run.remote(duration_s, start_spread_s) for h in handles])
    finally:
        if started_here:
            ray.shutdown()
    recorder = LatencyRecorder()
    agents: list[AgentReport] = []
    for r in results:
        agents += r["agents"]
        recorder.merge(r["samples"], r["errors"])
    return FleetReport(agents, recorder.summary(), time.monotonic() - t0, recorder.samples)


def run_threads_report(devices: Sequence[tuple[AgentConfig, Any]], *, duration_s: float = 0.0,
                       start_spread_s: float = 0.0, stop: Stop | None = None,
                       control_plane: bool = False) -> FleetReport:
    """The fleet as threads of this process, with a :class:`FleetReport`."""
    recorder = LatencyRecorder()
    t0 = time.monotonic()
    agents = run_agent_threads(devices, duration_s=duration_s, stop=stop, recorder=recorder,
                               start_spread_s=start_spread_s, control_plane=control_plane)
    return FleetReport(agents, recorder.summary(), time.monotonic() - t0, recorder.samples)


def print_report(report: FleetReport) -> None:
    """A few lines a person reads: registrations, outcomes, latency by call."""
    print(f"fleet: {report.registered}/{len(report.agents)} devices registered, outcomes {report.outcome_counts()}, "
          f"{report.seconds:.1f} s")
    for what, row in report.latency.items():
        if "p50_ms" in row:
            print(f"  {what:<22} {int(row['count']):>7} calls  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms"
                  f"  max {row['max_ms']:7.1f} ms  errors {int(row['errors'])}")
    for a in report.agents:
        if a.error:
            print(f"  {a.name}: crashed: {a.error}")
