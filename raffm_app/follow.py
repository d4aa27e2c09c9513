"""Following a running job from outside, as an operator would: the aggregator's status RPCs and /metrics, and the
accuracy of every new global model on the demo's held-out split (read from the checkpoint store)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from raffm.v1 import aggregator_pb2, aggregator_pb2_grpc
from raffm_app.processes import ProcessGroup

if TYPE_CHECKING:
    from raffm.report import RunReport
    from raffm_app.demo import DemoSettings


def operator_stub(address: str) -> Any:
    """A sync AggregatorService stub (status calls carry the operator token as metadata)."""
    return aggregator_pb2_grpc.AggregatorServiceStub(grpc.insecure_channel(address))


def final_version(address: str, token: str) -> str:
    """The job's current model version: after the last round, the final global model."""
    job = operator_stub(address).GetJob(aggregator_pb2.GetJobRequest(),
                                        metadata=[("authorization", f"Bearer {token}")], timeout=10)
    return str(job.model_version)


# Counted by the aggregator when it accepts an update: the slice bytes each participant moved, by device tier.
_TIER_COUNTERS = {"raffm_aggregator_download_bytes_total": "down", "raffm_aggregator_upload_bytes_total": "up"}


def scrape_tier_bytes(port: int) -> dict[tuple[str, str], float]:
    """``(direction, tier) -> bytes`` from the aggregator's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _TIER_COUNTERS:
                key = (_TIER_COUNTERS[sample.name], sample.labels["tier"])
                values[key] = values.get(key, 0.0) + sample.value
    return values


def tier_bytes(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[str, dict[str, int]]:
    """``tier -> {"down": bytes, "up": bytes}`` moved between two scrapes."""
    out: dict[str, dict[str, int]] = {}
    for (direction, tier), value in after.items():
        out.setdefault(tier, {"down": 0, "up": 0})[direction] += int(value - before.get((direction, tier), 0.0))
    return out


def _model_and_tokenizer(settings: DemoSettings, store: Path, version: str) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from raffm.checkpoints import checkpoint_store_from_url
    from raffm.models import model_from_state, resolve_model

    checkpoints = checkpoint_store_from_url(str(store))
    model = model_from_state(checkpoints.info(version).config, checkpoints.load(version))
    return model, AutoTokenizer.from_pretrained(resolve_model(settings.model))


def evaluate_version(settings: DemoSettings, store: Path, version: str, test: Any) -> float:
    """Test accuracy of a model version of the checkpoint store on the held-out split."""
    from raffm.training import evaluate

    model, tokenizer = _model_and_tokenizer(settings, store, version)
    return evaluate(model, test, tokenizer, seq_len=settings.seq_len)


def scaling(settings: DemoSettings, store: Path, version: str, test: Any) -> list[Any]:
    """The inference-scaling table of a version: sub-models cut to several sizes, each evaluated."""
    from raffm.scaling import scaling_table

    model, tokenizer = _model_and_tokenizer(settings, store, version)
    return scaling_table(model, test, tokenizer, seq_len=settings.seq_len)


def follow_job(
    settings: DemoSettings, group: ProcessGroup, address: str, token: str, store: Path, test: Any, report: RunReport,
    metrics: dict[str, int],
) -> None:
    """Print a line per closed round until the job ends; fill ``report.rounds``."""
    from tqdm import tqdm

    from raffm.report import RoundRecord

    stub = operator_stub(address)
    auth = [("authorization", f"Bearer {token}")]
    job = stub.GetJob(aggregator_pb2.GetJobRequest(), metadata=auth, timeout=10)
    report.initial_accuracy = evaluate_version(settings, store, job.model_version, test)
    print(f"round 0: global test accuracy {report.initial_accuracy:.1%} (majority class {report.majority_rate:.1%})")
    seen: set[str] = set()
    # The aggregator's counters start at zero and the fleet was started before this evaluation: counting from zero
    # (not from a scrape now) keeps bytes that a fast first round moved meanwhile.
    before: dict[tuple[str, str], float] = {}
    bar = tqdm(total=settings.rounds, desc="rounds", unit="round", disable=not sys.stderr.isatty())
    done_states = (aggregator_pb2.JOB_STATE_COMPLETED, aggregator_pb2.JOB_STATE_FAILED, aggregator_pb2.JOB_STATE_CANCELLED)
    while True:
        group.check(allow_exit=("fleet",))
        try:
            job = stub.GetJob(aggregator_pb2.GetJobRequest(), metadata=auth, timeout=10)
            rounds = stub.ListRounds(aggregator_pb2.ListRoundsRequest(page_size=1000), metadata=auth, timeout=10).rounds
        except grpc.RpcError as exc:
            print(f"(aggregator not answering: {exc.code().name}; retrying)", file=sys.stderr)
            time.sleep(2)
            continue
        for r in sorted(rounds, key=lambda r: r.index):
            if r.round_id in seen or r.state not in (aggregator_pb2.ROUND_STATE_CLOSED, aggregator_pb2.ROUND_STATE_FAILED):
                continue
            seen.add(r.round_id)
            after = scrape_tier_bytes(metrics["aggregator"])
            accuracy = (evaluate_version(settings, store, r.result_model_version, test)
                        if r.result_model_version else None)
            duration = (r.closed_at.ToDatetime() - r.opened_at.ToDatetime()).total_seconds()
            record = RoundRecord(
                index=r.index, accuracy=accuracy, participants=r.accepted, assigned=r.assigned, dropouts=r.dropped,
                bytes_down=r.bytes_down, bytes_up=r.bytes_up, full_fedavg_bytes=r.full_model_bytes,
                duration_s=duration, mean_train_loss=r.mean_train_loss or None, bytes_by_tier=tier_bytes(before, after),
            )
            before = after
            report.rounds.append(record)
            bar.update(1)
            acc = "n/a" if accuracy is None else f"{accuracy:.1%}"
            tqdm.write(
                f"round {r.index}: global test accuracy {acc}, participants {r.accepted}/{r.assigned}, "
                f"dropouts {r.dropped}, down {r.bytes_down / 2**20:.1f} MiB, up {r.bytes_up / 2**20:.1f} MiB, "
                f"full-model FedAvg would move {r.full_model_bytes / 2**20:.1f} MiB, {duration:.0f} s"
            )
        if job.state in done_states:
            break
        time.sleep(1.0)
    bar.close()
    if job.state != aggregator_pb2.JOB_STATE_COMPLETED:
        raise RuntimeError(f"the job ended as {aggregator_pb2.JobState.Name(job.state)}; see {group.log_dir}")
