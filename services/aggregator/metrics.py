"""Aggregator metrics, built on a registry the caller owns. Labels: tier, wire dtype, reason, outcome; never a device."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ROUND_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
# measured / predicted: a device exactly as declared lands in the 1.0 bucket; 2-4x liars land far from it.
RATIO_BUCKETS = (0.125, 0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class AggregatorMetrics:
    bytes_up: Counter
    bytes_received: Counter
    bytes_down: Counter
    bytes_down_assigned: Counter
    full_model_bytes: Counter
    round_duration: Histogram
    rounds: Counter
    participants: Gauge
    assignments: Counter
    repeated_polls: Counter
    accepted: Counter
    dropouts: Counter
    rejected: Counter
    fold_seconds: Histogram
    eval_metric: Gauge
    current_round: Gauge
    measured_ratio: Histogram
    unfit: Counter


def build_aggregator_metrics(registry: CollectorRegistry) -> AggregatorMetrics:
    return AggregatorMetrics(
        bytes_up=Counter("raffm_aggregator_upload_bytes", "Update bytes received on the wire, by device tier and wire dtype.",
                         ("tier", "wire_dtype"), registry=registry),
        # Counted per chunk as it arrives (accepted or not): what a round in flight has moved up so far.
        bytes_received=Counter("raffm_aggregator_upload_received_bytes",
                               "Update bytes received as chunks arrive, before any acceptance, by device tier.",
                               ("tier",), registry=registry),
        # Bytes down, three views: raffm_extractor_download_bytes counts what the extractor actually streamed
        # (dropouts and aborted streams included); this one counts the slices of the devices whose update was
        # accepted (each downloaded its slice in full); the assigned one below what every assignment entailed.
        bytes_down=Counter(
            "raffm_aggregator_download_bytes",
            "Slice bytes downloaded by devices whose update was accepted (their complete slices), by device tier "
            "and wire dtype; compare with raffm_aggregator_full_model_fedavg_bytes.",
            ("tier", "wire_dtype"), registry=registry),
        bytes_down_assigned=Counter(
            "raffm_aggregator_assigned_download_bytes",
            "Slice bytes handed out in assignments (what devices must download), by device tier and wire dtype.",
            ("tier", "wire_dtype"), registry=registry),
        full_model_bytes=Counter(
            "raffm_aggregator_full_model_fedavg_bytes",
            "Bytes full-model FedAvg would have moved for the same accepted participants (down plus up).",
            ("wire_dtype",), registry=registry),
        round_duration=Histogram("raffm_aggregator_round_duration_seconds", "Round wall time from open to close.",
                                 ("outcome",), buckets=ROUND_BUCKETS, registry=registry),
        rounds=Counter("raffm_aggregator_rounds", "Rounds finished, by outcome (closed, failed).", ("outcome",),
                       registry=registry),
        participants=Gauge("raffm_aggregator_round_participants", "Accepted updates in the last finished round.",
                           registry=registry),
        assignments=Counter("raffm_aggregator_assignments", "Assignments handed out, by device tier.", ("tier",),
                            registry=registry),
        # A device polled again before uploading (it lost the reply): it got the same assignment, not a new one.
        repeated_polls=Counter("raffm_aggregator_assignments_redelivered",
                               "Polls answered with an assignment the device already held (its earlier reply was lost).",
                               registry=registry),
        accepted=Counter("raffm_aggregator_updates_accepted", "Updates accepted, by device tier.", ("tier",),
                         registry=registry),
        dropouts=Counter("raffm_aggregator_dropouts",
                         "Assigned devices that reported failure or never delivered before the round closed.",
                         ("reason",), registry=registry),
        rejected=Counter("raffm_aggregator_updates_rejected", "Updates rejected, by reason.", ("reason",),
                         registry=registry),
        fold_seconds=Histogram("raffm_aggregator_fold_seconds", "Time to validate and fold one accepted update.",
                               registry=registry),
        eval_metric=Gauge("raffm_aggregator_eval", "Held-out evaluation of the latest global model, by metric and size.",
                          ("metric", "size"), registry=registry),
        current_round=Gauge("raffm_aggregator_current_round", "Index of the open (or last) round.", registry=registry),
        measured_ratio=Histogram(
            "raffm_aggregator_measured_over_predicted",
            "What devices measured over what their declared profile predicted, per accepted update, by device tier "
            "and quantity (memory, compute, down, up); above 1 the device was slower or used more memory than "
            "declared (memory: the peak less the fitter's fixed margin for runtime costs, as calibration uses it).",
            ("tier", "quantity"), buckets=RATIO_BUCKETS, registry=registry),
        unfit=Counter("raffm_aggregator_unfit_polls",
                      "Polls answered with a wait because no sub-model fits the device (memory or time left), by "
                      "device tier and reason.", ("tier", "reason"), registry=registry),
    )
