"""Extractor metrics, built on a registry the caller owns. Labels: tier, wire dtype, outcome; never a device."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

BUILD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class ExtractorMetrics:
    bytes_down: Counter
    cache_hits: Counter
    cache_misses: Counter
    slice_build_seconds: Histogram
    plans: Counter
    downloads: Counter


def build_extractor_metrics(registry: CollectorRegistry) -> ExtractorMetrics:
    return ExtractorMetrics(
        bytes_down=Counter("raffm_extractor_download_bytes", "Slice bytes streamed to devices, by device tier and wire dtype.",
                           ("tier", "wire_dtype"), registry=registry),
        cache_hits=Counter("raffm_extractor_slice_cache_hits", "Slice requests served from the slice cache.",
                           registry=registry),
        cache_misses=Counter("raffm_extractor_slice_cache_misses", "Slice requests that built a slice.",
                             registry=registry),
        slice_build_seconds=Histogram("raffm_extractor_slice_build_seconds",
                                      "Time to cut, convert and hash one slice.", buckets=BUILD_BUCKETS,
                                      registry=registry),
        plans=Counter("raffm_extractor_plans", "Plan calls, by outcome (fitted, no_fit).", ("outcome",),
                      registry=registry),
        downloads=Counter("raffm_extractor_downloads", "Slice downloads, by outcome (complete, resumed, aborted).",
                          ("outcome",), registry=registry),
    )
