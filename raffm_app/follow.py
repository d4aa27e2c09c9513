"""Following a running job from outside, as an operator would: the aggregator's status RPCs and /metrics (progress
inside a round, the held-out accuracy the aggregator measured after it), and the accuracy of a model version on the
demo's held-out split (read from the checkpoint store) where the aggregator gives none."""

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
# Counted as the bytes move (accepted or not): the extractor's streamed slices, the aggregator's received chunks.
LIVE_DOWN, LIVE_UP = "raffm_extractor_download_bytes_total", "raffm_aggregator_upload_received_bytes_total"
SCRAPE_S = 5.0


def _scrape(port: int) -> list[Any]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def scrape_tier_bytes(port: int) -> dict[tuple[str, str], float]:
    """``(direction, tier) -> bytes`` from the aggregator's /metrics."""
    values: dict[tuple[str, str], float] = {}
    for sample in _scrape(port):
        if sample.name in _TIER_COUNTERS:
            key = (_TIER_COUNTERS[sample.name], sample.labels["tier"])
            values[key] = values.get(key, 0.0) + sample.value
    return values


def scrape_moved_bytes(extractor_port: int, aggregator_port: int) -> int:
    """Bytes moved so far, down (streamed by the extractor) plus up (received by the aggregator), failed and
    unfinished transfers included; 0 for an endpoint that does not answer."""
    total = 0.0
    for port, name in ((extractor_port, LIVE_DOWN), (aggregator_port, LIVE_UP)):
        try:
            total += sum(s.value for s in _scrape(port) if s.name == name)
        except OSError:
            pass
    return int(total)


class RoundProgress:
    """What the round in flight has done: devices done of those expected, bytes moved, elapsed time. A live bar on a
    terminal; otherwise a line when the round is first seen and then every ``every_s`` seconds."""

    def __init__(self, expected: int, rounds: int, ports: dict[str, int], *, every_s: float = 15.0,
                 live: bool | None = None, out: Any = None) -> None:
        self.expected, self.rounds, self.ports, self.every_s = expected, rounds, ports, every_s
        self.live = sys.stderr.isatty() if live is None else live
        self.out = out if out is not None else sys.stdout
        self._round = -1
        self._start_bytes = 0
        self._last_line = 0.0
        self._moved_bytes, self._scraped_at = 0, 0.0
        self._bar: Any = None

    def moved(self) -> int:
        return scrape_moved_bytes(self.ports["extractor"], self.ports["aggregator"])

    def line(self, r: Any, moved: int, now: float) -> str:
        """``round 2: 3/8 devices done (1 failed), 120.5 MiB moved, 45 s``."""
        expected = max(self.expected, r.assigned)
        failed = f" ({r.dropped} failed)" if r.dropped else ""
        elapsed = max(0.0, now - r.opened_at.ToMicroseconds() / 1e6) if r.opened_at.seconds else 0.0
        state = ", aggregating" if r.state == aggregator_pb2.ROUND_STATE_AGGREGATING else ""
        return (f"round {r.index}: {r.accepted + r.dropped}/{expected} devices done{failed}, "
                f"{moved / 2**20:.1f} MiB moved, {elapsed:.0f} s{state}")

    def update(self, r: Any) -> None:
        """Show the progress of ``r``, a round that is open or aggregating."""
        from tqdm import tqdm

        now = time.time()
        if r.index != self._round:
            self.close()
            self._round, self._start_bytes, self._last_line = r.index, self._safe_moved(), 0.0
            self._moved_bytes, self._scraped_at = 0, now
            if self.live:
                self._bar = tqdm(total=max(self.expected, r.assigned), desc=f"round {r.index}/{self.rounds}",
                                 unit="device", leave=False, bar_format="{desc}: {n}/{total} devices done |{bar}| "
                                 "{postfix}")
        if self._bar is not None:
            moved = self._moved(now)
            self._bar.total = max(self.expected, r.assigned)
            self._bar.n = r.accepted + r.dropped
            elapsed = now - r.opened_at.ToMicroseconds() / 1e6 if r.opened_at.seconds else 0.0
            self._bar.set_postfix_str(f"{moved / 2**20:.1f} MiB moved, {elapsed:.0f} s"
                                      + (f", {r.dropped} failed" if r.dropped else ""))
        elif now - self._last_line >= self.every_s:
            print(self.line(r, self._safe_moved() - self._start_bytes, now), file=self.out, flush=True)
            self._last_line = now

    def _moved(self, now: float) -> int:
        """Bytes moved in this round for the live bar, scraped at most every ``SCRAPE_S`` (lines scrape when they are
        printed): a scrape parses both services' whole /metrics and makes them render it; at one a second the demo's
        own process spent about 7% of a core on it."""
        if now - self._scraped_at >= SCRAPE_S:
            self._moved_bytes, self._scraped_at = self._safe_moved() - self._start_bytes, now
        return self._moved_bytes

    def _safe_moved(self) -> int:
        try:
            return self.moved()
        except Exception:  # noqa: BLE001 - progress is best effort; the round's figures come from the aggregator
            return 0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def tier_bytes(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[str, dict[str, int]]:
    """``tier -> {"down": bytes, "up": bytes}`` moved between two scrapes."""
    out: dict[str, dict[str, int]] = {}
    for (direction, tier), value in after.items():
        out.setdefault(tier, {"down": 0, "up": 0})[direction] += int(value - before.get((direction, tier), 0.0))
    return out


class RoundFailed(RuntimeError):
    """A round failed: no update arrived. The message says what its devices reported."""


def _task(test: Any) -> str:
    from raffm.data import ImageDataset
    from raffm.generative import InstructionDataset

    if isinstance(test, InstructionDataset):
        return "causal-lm"
    return "image-classification" if isinstance(test, ImageDataset) else "sequence-classification"


def _model_and_tokenizer(settings: DemoSettings, store: Path, version: str, test: Any) -> tuple[Any, Any, Any]:
    """The version's model, its tokenizer (None for images) and ``test`` as the model takes it."""
    from raffm.checkpoints import checkpoint_store_from_url
    from raffm.models import model_from_state, resolve_model

    checkpoints = checkpoint_store_from_url(str(store))
    task = _task(test)
    model = model_from_state(checkpoints.info(version).config, checkpoints.load(version), task=task)  # type: ignore[arg-type]
    if task == "image-classification":
        return model, None, test.fitted(model.config)
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(resolve_model(settings.model)), test


def evaluate_version(settings: DemoSettings, store: Path, version: str, test: Any) -> tuple[float, float | None]:
    """(test accuracy, None) of a model version of the checkpoint store on the held-out split; for prompt ->
    response pairs (exact match, mean response-token loss)."""
    from raffm.generative import evaluate_generative
    from raffm.training import evaluate

    model, tokenizer, test = _model_and_tokenizer(settings, store, version, test)
    if _task(test) == "causal-lm":
        scores = evaluate_generative(model, test, tokenizer, batch_size=32, seq_len=settings.seq_len)
        return scores.exact_match, scores.loss
    return evaluate(model, test, tokenizer, seq_len=settings.seq_len), None


def scaling(settings: DemoSettings, store: Path, version: str, test: Any, *, max_samples: int = 0,
            unlabelled: Path | None = None, prior: Any = None) -> list[Any]:
    """The inference-scaling table of a version: sub-models cut to several sizes, each evaluated (on the first
    ``max_samples`` test examples when > 0; exact match for prompt -> response pairs), and with ``unlabelled``
    (a file the server holds) each cut also matched to the full model on it, and with a label ``prior`` served with
    its threshold there (:func:`raffm.scaling.scaling_table`)."""
    from raffm.data import ImageDataset, load_unlabelled
    from raffm.generative import evaluate_generative
    from raffm.scaling import scaling_table

    model, tokenizer, test = _model_and_tokenizer(settings, store, version, test)
    if max_samples and len(test) > max_samples:
        test = test.subset(range(max_samples))
    score = None
    if _task(test) == "causal-lm":
        def score(cut: Any) -> float:
            return evaluate_generative(cut, test, tokenizer, batch_size=32, seq_len=settings.seq_len).exact_match
    inputs = None if unlabelled is None else load_unlabelled(unlabelled)
    if isinstance(inputs, ImageDataset):
        inputs = inputs.fitted(model.config)
    return scaling_table(model, test, tokenizer, seq_len=settings.seq_len, score=score, unlabelled=inputs,
                         prior=prior)


def served_accuracy(settings: DemoSettings, store: Path, version: str, test: Any, unlabelled: Path,
                    prior: Any) -> float:
    """Test accuracy of a classifier version served with its threshold fitted to ``prior`` (the fleet's label
    shares) on the server's ``unlabelled`` inputs (:func:`raffm.threshold.fit_threshold`)."""
    from raffm.data import ImageDataset, load_unlabelled
    from raffm.threshold import fit_threshold
    from raffm.training import evaluate

    model, tokenizer, test = _model_and_tokenizer(settings, store, version, test)
    inputs = load_unlabelled(unlabelled)
    if isinstance(inputs, ImageDataset):
        inputs = inputs.fitted(model.config)
    fit_threshold(model, inputs, tokenizer, prior, seq_len=settings.seq_len)
    return evaluate(model, test, tokenizer, seq_len=settings.seq_len)


def failure_summary(r: Any) -> str:
    """What a round's devices reported when they gave up: ``2 x data: 'the local data has 3 labels; ...'``."""
    if not r.failures:
        return "no device reported why"
    return "; ".join(f"{f.devices} x {f.reason}: {f.detail!r}" for f in sorted(r.failures, key=lambda f: -f.devices))


def follow_job(
    settings: DemoSettings, group: ProcessGroup, address: str, token: str, store: Path, test: Any, report: RunReport,
    metrics: dict[str, int],
) -> None:
    """Print a line per closed round (and the progress of the round in flight) until the job ends; fill
    ``report.rounds``. A failed round stops the job's follower with :class:`RoundFailed` (its devices' reasons)."""
    from raffm.report import RoundRecord

    stub = operator_stub(address)
    auth = [("authorization", f"Bearer {token}")]
    job = stub.GetJob(aggregator_pb2.GetJobRequest(), metadata=auth, timeout=10)
    report.initial_accuracy, report.initial_loss = evaluate_version(settings, store, job.model_version, test)
    if report.initial_loss is None:
        print(f"round 0: global test accuracy {report.initial_accuracy:.1%} (majority class "
              f"{report.majority_rate:.1%})")
    else:
        print(f"round 0: held-out exact match {report.initial_accuracy:.1%}, loss {report.initial_loss:.3f} "
              f"(most frequent answer {report.majority_rate:.1%})", flush=True)
    seen: set[str] = set()
    # The aggregator's counters start at zero and the fleet was started before this evaluation: counting from zero
    # (not from a scrape now) keeps bytes that a fast first round moved meanwhile.
    before: dict[tuple[str, str], float] = {}
    progress = RoundProgress(settings.devices, settings.rounds, metrics, every_s=getattr(settings, "progress_s", 15.0))
    done_states = (aggregator_pb2.JOB_STATE_COMPLETED, aggregator_pb2.JOB_STATE_FAILED, aggregator_pb2.JOB_STATE_CANCELLED)
    finished = (aggregator_pb2.ROUND_STATE_CLOSED, aggregator_pb2.ROUND_STATE_FAILED)
    try:
        while True:
            group.check(allow_exit=("fleet",))
            try:
                job = stub.GetJob(aggregator_pb2.GetJobRequest(), metadata=auth, timeout=10)
                rounds = stub.ListRounds(aggregator_pb2.ListRoundsRequest(page_size=1000), metadata=auth,
                                         timeout=10).rounds
            except grpc.RpcError as exc:
                print(f"(aggregator not answering: {exc.code().name}; retrying)", file=sys.stderr)
                time.sleep(2)
                continue
            for r in sorted(rounds, key=lambda r: r.index):
                if r.round_id in seen:
                    continue
                if r.state not in finished:
                    progress.update(r)
                    continue
                seen.add(r.round_id)
                progress.close()
                if r.state == aggregator_pb2.ROUND_STATE_FAILED:
                    raise RoundFailed(f"round {r.index} failed: no update arrived ({r.assigned} assigned, "
                                      f"{r.dropped} gave up). The devices said: {failure_summary(r)}")
                after = scrape_tier_bytes(metrics["aggregator"])
                eval_loss: float | None = None
                # measured by the aggregator on the same held-out split
                if "accuracy" in r.evaluation or "exact_match" in r.evaluation:
                    accuracy: float | None = float(r.evaluation.get("accuracy", r.evaluation.get("exact_match", 0)))
                    eval_loss = float(r.evaluation["loss"]) if "loss" in r.evaluation else None
                elif r.result_model_version:
                    accuracy, eval_loss = evaluate_version(settings, store, r.result_model_version, test)
                else:
                    accuracy = None
                duration = (r.closed_at.ToDatetime() - r.opened_at.ToDatetime()).total_seconds()
                record = RoundRecord(
                    index=r.index, accuracy=accuracy, participants=r.accepted, assigned=r.assigned,
                    dropouts=r.dropped, bytes_down=r.bytes_down, bytes_up=r.bytes_up,
                    full_fedavg_bytes=r.full_model_bytes, duration_s=duration,
                    mean_train_loss=r.mean_train_loss or None, bytes_by_tier=tier_bytes(before, after),
                    eval_loss=eval_loss, balanced_accuracy=r.evaluation.get("balanced_accuracy"),
                    served_accuracy=r.evaluation.get("served_accuracy"),
                    tiers={t.tier: {"devices": t.devices, "params": t.params, "trained_params": t.trained_params,
                                    "predicted_memory_mb": round(t.predicted_memory_mb, 1),
                                    "peak_memory_mb": round(t.peak_memory_mb, 1)} for t in r.tiers},
                    label_counts=list(r.label_counts),
                )
                before = after
                report.rounds.append(record)
                acc = "n/a" if accuracy is None else f"{accuracy:.1%}"
                failed = f" ({failure_summary(r)})" if r.failures else ""
                balanced = "" if record.balanced_accuracy is None else f" (balanced {record.balanced_accuracy:.1%})"
                served = "" if record.served_accuracy is None else f", served {record.served_accuracy:.1%}"
                score = (f"global test accuracy {acc}{balanced}{served}" if report.metric == "accuracy" else
                         f"held-out {report.metric} {acc}" + ("" if eval_loss is None else f", loss {eval_loss:.3f}"))
                print(f"round {r.index}: {score}, participants {r.accepted}/{r.assigned}, "
                      f"dropouts {r.dropped}{failed}, down {r.bytes_down / 2**20:.1f} MiB, "
                      f"up {r.bytes_up / 2**20:.1f} MiB, full-model FedAvg would move "
                      f"{r.full_model_bytes / 2**20:.1f} MiB, {duration:.0f} s", flush=True)
            if job.state in done_states:
                break
            time.sleep(1.0)
    finally:
        progress.close()
    if job.state != aggregator_pb2.JOB_STATE_COMPLETED:
        raise RuntimeError(f"the job ended as {aggregator_pb2.JobState.Name(job.state)}; see {group.log_dir}")
