"""Registry metrics: devices by state and tier (read from the database at scrape time), registrations, and liveness
transitions."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from raffm.profile import TIERS
from services.registry.domain import DeviceState

log = logging.getLogger(__name__)
DeviceCounts = Callable[[], Mapping[tuple[DeviceState, str], int]]


@dataclass(frozen=True)
class RegistryMetrics:
    registrations: Counter
    marked_offline: Counter


class DeviceGaugeCollector(Collector):
    """``raffm_registry_devices{state, tier}``, computed from the repository on every scrape (always current)."""

    def __init__(self, counts: DeviceCounts) -> None:
        self._counts = counts

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Describing without counting keeps registration free of database work.
        yield GaugeMetricFamily("raffm_registry_devices", "Registered devices by liveness state and tier.",
                                labels=("state", "tier"))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("raffm_registry_devices", "Registered devices by liveness state and tier.",
                                   labels=("state", "tier"))
        try:
            counts = self._counts()
        except Exception:  # noqa: BLE001 - a database hiccup must not break the whole scrape
            log.exception("could not count devices for metrics")
            return
        # Every (state, tier) pair, zeros included, so dashboards see empty tiers too.
        for state in DeviceState:
            for tier in sorted(set(TIERS) | {t for _, t in counts}):
                family.add_metric((state.value, tier), counts.get((state, tier), 0))
        yield family


def build_registry_metrics(registry: CollectorRegistry, device_counts: DeviceCounts | None = None) -> RegistryMetrics:
    """Register the registry's metrics on ``registry``; ``device_counts`` feeds the device gauge."""
    if device_counts is not None:
        registry.register(DeviceGaugeCollector(device_counts))
    return RegistryMetrics(
        registrations=Counter("raffm_registry_registrations", "Successful Register calls by result.",
                              ("result",), registry=registry),
        marked_offline=Counter("raffm_registry_devices_marked_offline",
                               "Devices marked offline after missing heartbeats for the liveness window.",
                               registry=registry),
    )
