"""The edge agent's loop: register once, heartbeat, poll, and run each assignment to an upload or a reported failure.

One assignment: check the predicted memory against the declared budget (refuse and report when it does not fit) ->
download the slice (resume, sha256, re-fetch) -> check again with the real model config -> build the sub-model ->
train (FedProx when asked) -> upload the delta in the job's wire dtype (resume via QueryUpload) -> poll again.
Nothing that goes wrong inside an assignment stops the agent: it is reported with ReportFailure, logged, and the
agent goes back to polling. Only a stop request (SIGTERM/SIGINT) or a configuration error ends :meth:`Agent.run`.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc

from edge_agent.cache import TensorCache
from edge_agent.client import FaultInjector, ServiceClient, ServiceError, Stopped, Stopper
from edge_agent.config import AgentConfig
from edge_agent.identity import IDENTITY_LOST, Heartbeat, Identity
from edge_agent.profile import resolve_profile
from edge_agent.progress import Progress
from edge_agent.state import AgentState, StateLock, clean_temporaries, load_state
from edge_agent.throttle import Pace
from raffm.memory import collect_garbage, process_shared
from raffm.profile import DeviceProfile
from raffm.v1 import aggregator_pb2

log = logging.getLogger("edge_agent.agent")

FR = aggregator_pb2  # FailureReason values live in the aggregator module
TASKS = {aggregator_pb2.TASK_KIND_TEXT_CLASSIFICATION: "sequence-classification",
         aggregator_pb2.TASK_KIND_IMAGE_CLASSIFICATION: "image-classification",
         aggregator_pb2.TASK_KIND_CAUSAL_LM: "causal-lm"}
MAX_WAIT_S = 300.0


class AssignmentRefused(Exception):
    """The agent will not do this assignment; ``reason`` is a raffm.v1.FailureReason value."""

    def __init__(self, reason: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Outcome:
    """What happened to one assignment (also what tests and the simulator inspect)."""

    round_id: str
    status: str  # "uploaded", "refused", "failed", "late", "stopped"
    detail: str = ""
    predicted_mb: float = 0.0
    peak_memory_mb: float = 0.0
    samples: int = 0
    loss: float = 0.0
    download_resumes: int = 0
    download_refetches: int = 0
    upload_resumes: int = 0
    upload_resumed_at: tuple[int, ...] = ()  # bytes the aggregator already held at each upload resume


class Agent:
    """``Agent(config).run()`` until stopped; ``dataset``/``profile`` may be injected (simulator, tests)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        stopper: Stopper | None = None,
        faults: FaultInjector | None = None,
        dataset: Any = None,
        profile: DeviceProfile | None = None,
    ) -> None:
        self.config = config
        self.stopper = stopper or Stopper()
        self.client = ServiceClient(config, self.stopper, faults=faults)
        self.progress = Progress(config.progress)
        self._dataset = dataset
        self._data_key: tuple[str, tuple[str, ...]] | None = None  # what self._dataset was read for (None: given)
        self._profile = profile
        self._tokenizer: Any = None
        self._warmed_up = False
        self._last_config: Any = None  # global config of the last download, for pre-download checks
        self.cache = TensorCache(config.state_path / "cache")  # frozen tensors kept between rounds
        self.outcomes: list[Outcome] = []
        self._last_upload_mbps = 0.0  # throughput of the previous upload, reported with the next one
        self.identity: Identity | None = None
        self.heartbeat: Heartbeat | None = None

    # ------------------------------------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Run until stopped or ``max_rounds`` assignments finished; returns an exit status (0 on a clean stop)."""
        from raffm.memory import configure_allocator

        configure_allocator()  # freed tensors leave RSS at once: the measured peak is the real one
        if self.config.threads:
            import torch

            torch.set_num_threads(self.config.threads)
        state_dir = self.config.state_path
        self.stopper.start_watcher()
        with StateLock(state_dir):
            clean_temporaries(state_dir)
            self.identity = Identity(self.client, load_state(state_dir))
            try:
                profile = self._profile or resolve_profile(self.config)
                self._profile = profile
                self.identity.ensure_registered(profile)
                self.heartbeat = Heartbeat(self.identity)
                self.heartbeat.start()
                self._loop()
            except Stopped:
                pass
            finally:
                if self.heartbeat is not None:
                    self.heartbeat.stop()
                self.client.close()
                self.stopper.close()
        log.info("agent stopped (%s)", self.stopper.reason or "done", extra={"event": "stopped"})
        return 0

    def stop(self, reason: str = "stop requested") -> None:
        self.stopper.stop(reason)

    def _loop(self) -> None:
        assert self.identity is not None and self._profile is not None
        finished = 0
        last_wait = ""
        while True:
            self.stopper.check()
            if self.identity.lost.is_set():
                log.warning("the registry rejected this device's token; registering again",
                            extra={"event": "identity_lost"})
                self.identity.ensure_registered(self._profile)
            try:
                reply = self.client.call(
                    "aggregator.PollRound", self.client.aggregator.PollRound,
                    aggregator_pb2.PollRequest(device_id=self.identity.device_id), target=self.config.aggregator,
                )
            except ServiceError as exc:
                if exc.code in IDENTITY_LOST:
                    self.identity.lost.set()
                    continue
                # A permanent error from the aggregator (misconfiguration, a bug): keep polling, slowly.
                log.error("polling failed: %s", exc, extra={"event": "poll_failed", "code": exc.code.name})
                self.stopper.wait(self.config.backoff_max_s)
                continue
            if reply.WhichOneof("action") == "assignment":
                last_wait = ""
                outcome = self.handle(reply.assignment)
                self.outcomes.append(outcome)
                self._record(outcome)
                if outcome.status == "stopped":
                    raise Stopped(self.stopper.reason)
                finished += 1
                if self.config.max_rounds and finished >= self.config.max_rounds:
                    log.info("finished %d assignments (--max-rounds)", finished, extra={"event": "max_rounds"})
                    return
                continue
            wait = reply.wait
            seconds = min(MAX_WAIT_S, max(0.05, wait.seconds or 1.0))
            gist = re.sub(r"[\d.]+", "#", wait.reason)  # the same wait with other numbers is not news
            if gist != last_wait:
                log.info("no assignment: %s; polling again every ~%.1fs", wait.reason or "wait", seconds,
                         extra={"event": "wait", "reason": wait.reason, "seconds": round(seconds, 2)})
                last_wait = gist
            self.stopper.wait(seconds * random.uniform(0.9, 1.1))

    def _record(self, outcome: Outcome) -> None:
        assert self.identity is not None
        state: AgentState = self.identity.state
        entry = f"{outcome.round_id}:{outcome.status}"
        self.identity.save(replace(
            state, rounds_done=state.rounds_done + (outcome.status == "uploaded"), last_round_id=outcome.round_id,
            history=(*state.history, entry)[-20:],
        ))

    # ------------------------------------------------------------------------------------------------ one round

    def handle(self, a: aggregator_pb2.Assignment) -> Outcome:
        """Run one assignment to an upload or a reported failure; never raises except :class:`Stopped`."""
        log.info("assignment for round %s (#%d, model %s): %d layers, hidden %d, predicted %.0f MiB",
                 a.round_id, a.round_index, a.model_version, len(a.spec.layers), a.spec.hidden,
                 a.predicted.train_memory_mb,
                 extra={"event": "assignment", "round": a.round_id, "predicted_mb": a.predicted.train_memory_mb})
        outcome = Outcome(round_id=a.round_id, status="failed")
        try:
            self._run_assignment(a, outcome)
            return outcome
        except Stopped:
            self._report(a, FR.FAILURE_REASON_OTHER, f"agent stopping ({self.stopper.reason})", force=True)
            outcome.status, outcome.detail = "stopped", self.stopper.reason
            return outcome
        except AssignmentRefused as exc:
            outcome.status = "refused" if exc.reason in (FR.FAILURE_REASON_REFUSED, FR.FAILURE_REASON_DEADLINE) \
                else "failed"
            outcome.detail = exc.detail
            log.warning("%s round %s: %s", "refusing" if outcome.status == "refused" else "giving up", a.round_id,
                        exc.detail, extra={"event": outcome.status, "round": a.round_id,
                                           "reason": FR.FailureReason.Name(exc.reason)})
            self._report(a, exc.reason, exc.detail)
            return outcome
        except ServiceError as exc:
            if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                outcome.status, outcome.detail = "late", exc.details
                log.warning("round %s closed before this device finished: %s", a.round_id, exc.details,
                            extra={"event": "late", "round": a.round_id})
                return outcome
            outcome.detail = str(exc)
            log.error("round %s failed: %s", a.round_id, exc, extra={"event": "round_failed", "round": a.round_id})
            self._report(a, FR.FAILURE_REASON_OTHER, str(exc))
            return outcome
        except Exception as exc:  # noqa: BLE001 - a bug or an unexpected library error must not kill the agent
            outcome.detail = f"{type(exc).__name__}: {exc}"
            log.exception("round %s crashed", a.round_id, extra={"event": "round_crashed", "round": a.round_id})
            self._report(a, FR.FAILURE_REASON_CRASH, outcome.detail)
            return outcome
        finally:
            collect_garbage()

    def _report(self, a: aggregator_pb2.Assignment, reason: int, detail: str, *, force: bool = False) -> None:
        """ReportFailure, best effort (a few attempts; also while stopping, so the round does not wait for us)."""
        request = aggregator_pb2.ReportFailureRequest(ticket=a.ticket, reason=reason,  # type: ignore[arg-type]
                                                      detail=detail[:1000])
        stub = self.client.aggregator
        for attempt in range(3):
            try:
                stub.ReportFailure(request, timeout=min(5.0, self.config.rpc_timeout_s),
                                   metadata=self.client.metadata())
                log.info("reported %s for round %s", FR.FailureReason.Name(reason), a.round_id,
                         extra={"event": "reported_failure", "round": a.round_id,
                                "reason": FR.FailureReason.Name(reason)})
                return
            except Exception as exc:  # noqa: BLE001
                if attempt == 2 or (self.stopper.stopped and not force):
                    log.warning("could not report the failure of round %s: %s", a.round_id, exc)
                    return
                time.sleep(0.2 * (attempt + 1))

    def _run_assignment(self, a: aggregator_pb2.Assignment, outcome: Outcome) -> None:
        from edge_agent import submodel, trainer
        from edge_agent.transfer import TransferError, download_slice, upload_update
        from raffm.generative import InstructionDataset
        from raffm.proto import recipe_from_proto, spec_from_proto
        from raffm.training import LocalConfig
        from raffm.wire import tensor_bytes

        assert self._profile is not None
        budget = float(self._profile.train_memory_mb)
        spec = spec_from_proto(a.spec)
        recipe = recipe_from_proto(a.recipe)
        hp = a.hparams
        task = TASKS.get(a.task.kind, "sequence-classification")  # unspecified (an older server): text
        image = task == "image-classification"
        try:
            local = LocalConfig(
                batch_size=hp.batch_size or 16, seq_len=hp.seq_len or 64, lr=hp.lr or 5e-5,
                local_epochs=hp.local_epochs or 1, local_steps=hp.local_steps, fedprox_mu=hp.fedprox_mu,
                weight_decay=hp.weight_decay, seed=hp.seed, warmup_steps=hp.warmup_steps,
                optimizer=hp.optimizer or "adamw",
            )
        except ValueError as exc:  # e.g. an optimizer this agent does not have
            raise AssignmentRefused(FR.FAILURE_REASON_OTHER, f"the assignment's hyper-parameters: {exc}") from None
        if a.HasField("deadline") and a.deadline.seconds and a.deadline.ToSeconds() < time.time():
            raise AssignmentRefused(FR.FAILURE_REASON_DEADLINE, "the assignment's deadline has already passed")

        # 1. Budget, before spending bandwidth: the server's prediction, and ours when we know the model.
        predicted = float(a.predicted.train_memory_mb)
        if self._last_config is not None:
            try:
                mine = trainer.predict_memory(self._last_config, spec, batch_size=local.batch_size,
                                              seq_len=local.seq_len, fedprox=local.fedprox_mu > 0, image=image,
                                              recipe=recipe, task=task)
                predicted = max(predicted, mine.total_mb)
            except ValueError:
                pass  # the spec belongs to another model than the last one: checked again after the download
        outcome.predicted_mb = predicted
        self._check_budget(predicted, budget)

        # Loading data, the tokenizer and the runtime take seconds each (more on a busy machine): a stop request
        # between them ends the round there, instead of after a download and a training step nobody will use.
        data = self._data(task, a.task.label_names)
        self.stopper.check()
        if isinstance(data, InstructionDataset) != (task == "causal-lm"):
            have = "prompt -> response pairs" if isinstance(data, InstructionDataset) else "labelled examples"
            raise AssignmentRefused(FR.FAILURE_REASON_DATA, f"the local data are {have}; the job's task is {task}")
        if task != "causal-lm" and data.num_labels > max(a.task.num_labels, 1) and a.task.num_labels:
            raise AssignmentRefused(FR.FAILURE_REASON_DATA, f"the local data has {data.num_labels} labels; the job's "
                                                            f"model has {a.task.num_labels}")
        tokenizer = None if image else self._get_tokenizer()
        self.stopper.check()

        # 2. Download (memory measured from here: the downloaded weights are part of the round's footprint).
        if not self._warmed_up and not process_shared():
            # A one-layer model of the same kind trains first, so the runtime's one-off lazy init (thread pools,
            # kernel caches, BLAS buffers) is not charged to the first round's measured peak (in a process that
            # many agents share, no agent's peak is its own: nothing to calibrate).
            from raffm.memory import warm_up_config, warm_up_runtime

            warm_up_runtime(self._last_config or warm_up_config(data), local.batch_size, local.seq_len)
            self._warmed_up = True
            self.stopper.check()
        meter = trainer.MemoryMeter()
        meter.start()
        cfg = self.config
        down_pace = Pace(cfg.true_down_mbps * 1e6 / 8, wait=self.stopper.wait)
        try:
            download = download_slice(self.client, a, self.progress, self.cache)
        except TransferError as exc:
            raise AssignmentRefused(FR.FAILURE_REASON_DOWNLOAD, str(exc)) from None
        except ServiceError as exc:
            if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                raise
            raise AssignmentRefused(FR.FAILURE_REASON_DOWNLOAD, str(exc)) from None
        outcome.download_resumes, outcome.download_refetches = download.resumes, download.refetches
        download_bytes = download.bytes_received
        down_pace.done(download_bytes)  # a simulated slow link: the download ends when it would have there
        download_seconds = down_pace.elapsed
        config = submodel.global_config(download.manifest_proto, fallback_model=self.config.model,
                                        num_labels=a.task.num_labels)
        self._last_config = config
        if image:
            try:
                data = data.fitted(config)  # the images at the model's input size and channels
            except ValueError as exc:
                raise AssignmentRefused(FR.FAILURE_REASON_DATA, f"local data: {exc}") from None
        lora = recipe.lora is not None
        # With LoRA the whole base slice is frozen and only adapters travel up.
        names = [n for n in download.manifest.names if n not in recipe.frozen and (not lora or trainer.is_adapter(n))]
        # Keep the frozen tensors for the next round (their sha256 tells the extractor not to send them again).
        frozen = [m for m in download.manifest.tensors
                  if m.name in recipe.frozen or (lora and not trainer.is_adapter(m.name))]
        for meta in frozen:
            self.cache.put(meta.sha256, tensor_bytes(download.tensors[meta.name]))
        self.cache.keep(m.sha256 for m in frozen)

        # 3. Budget again, with the real model config.
        try:
            mine = trainer.predict_memory(config, spec, batch_size=local.batch_size, seq_len=local.seq_len,
                                          fedprox=local.fedprox_mu > 0, image=image, recipe=recipe, task=task)
        except ValueError as exc:
            raise AssignmentRefused(FR.FAILURE_REASON_OTHER, f"cannot cost the assigned spec: {exc}") from None
        predicted = max(float(a.predicted.train_memory_mb), mine.total_mb)
        outcome.predicted_mb = predicted
        self._check_budget(predicted, budget)
        self.stopper.check()

        # 4. Train.
        tensors = download.tensors
        del download
        bar = self.progress.bar("train", 0, "step", event="train", round=a.round_id)

        step_pace = Pace(cfg.true_gflops * 1e9, wait=self.stopper.wait)  # simulated slow compute (0: off)
        step_flops = float(a.predicted.flops_per_sample) * local.batch_size

        def on_step(step: int, total: int, loss: float) -> None:
            step_pace.done(step_flops)
            if bar.total != total:
                bar.set_total(total)
            bar.update(1, loss=f"{loss:.4f}")

        spill_path = self.config.state_path / "work" / f"received-{a.round_id or 'round'}.pt"
        try:
            with bar:
                result = trainer.run_local_round(
                    tensors, global_config=config, spec=spec, data=data, tokenizer=tokenizer, local=local,
                    spill_path=spill_path, meter=meter, on_step=on_step, should_stop=lambda: self.stopper.stopped,
                    recipe=recipe, task=task,
                )
        except InterruptedError:
            raise Stopped(self.stopper.reason) from None
        except (MemoryError, RuntimeError) as exc:
            if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() or "alloc" in str(exc).lower():
                raise AssignmentRefused(FR.FAILURE_REASON_OUT_OF_MEMORY, f"out of memory while training: {exc}") \
                    from None
            raise AssignmentRefused(FR.FAILURE_REASON_CRASH, f"training failed: {type(exc).__name__}: {exc}") \
                from None
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise AssignmentRefused(FR.FAILURE_REASON_DATA, f"training failed on the local data: "
                                                            f"{type(exc).__name__}: {exc}") from None
        except FloatingPointError as exc:
            raise AssignmentRefused(FR.FAILURE_REASON_OTHER, str(exc)) from None
        del tensors
        peak = meter.peak_mb
        outcome.peak_memory_mb, outcome.samples, outcome.loss = peak, result.samples, result.loss
        log.info("trained %d steps on %d samples in %.1fs: loss %.4f, peak memory %.0f MiB (predicted %.0f, "
                 "budget %.0f)", result.steps, result.samples, result.seconds, result.loss, peak, predicted, budget,
                 extra={"event": "trained", "round": a.round_id, "steps": result.steps, "loss": result.loss,
                        "peak_memory_mb": round(peak, 1), "predicted_mb": round(predicted, 1),
                        "budget_mb": budget})

        if lora and not names:  # no adapters came down: the device started fresh ones
            names = sorted(result.delta)

        # 5. Upload.
        # What the round really cost (closed-loop sizing: the aggregator corrects this device's profile with it).
        metrics = {"loss": result.loss, "steps": result.steps, "seconds": result.seconds, "peak_memory_mb": peak,
                   "download_bytes": download_bytes, "step_seconds": result.seconds / max(result.steps, 1),
                   "samples": result.samples, "download_seconds": download_seconds,
                   "download_mbps": 8 * download_bytes / download_seconds / 1e6 if download_seconds > 0 else 0.0,
                   "upload_mbps": self._last_upload_mbps, "label_counts": result.label_counts}
        up_pace = Pace(cfg.true_up_mbps * 1e6 / 8, wait=self.stopper.wait)
        try:
            # A rejected upload raises ServiceError with the status: FAILED_PRECONDITION (late) ends this assignment
            # as "late" in handle(); any other is reported to the aggregator as a failure.
            uploaded = upload_update(self.client, a, result.delta, names, result.samples, metrics, self.progress,
                                     on_chunk=up_pace.done if cfg.true_up_mbps > 0 else None)
            if up_pace.elapsed > 0 and uploaded.ack.bytes_received:
                self._last_upload_mbps = 8 * uploaded.ack.bytes_received / up_pace.elapsed / 1e6
        except TransferError as exc:
            raise AssignmentRefused(FR.FAILURE_REASON_OTHER, f"upload failed: {exc}") from None
        outcome.upload_resumes, outcome.upload_resumed_at = uploaded.resumes, uploaded.resumed_at
        outcome.status = "uploaded"

    def _check_budget(self, predicted_mb: float, budget_mb: float) -> None:
        if predicted_mb > budget_mb:
            raise AssignmentRefused(
                FR.FAILURE_REASON_REFUSED,
                f"predicted training memory {predicted_mb:.0f} MiB exceeds this device's declared budget "
                f"{budget_mb:.0f} MiB (--memory-mb)",
            )

    def _data(self, task: str, label_names: Sequence[str]) -> Any:
        """The local data, read once per task and label list (the job's: named labels are numbered by it)."""
        key = (task, tuple(label_names))
        if self._dataset is None or self._data_key not in (None, key):
            from edge_agent.localdata import load_local_data
            from raffm.generative import InstructionDataset

            try:
                self._dataset = load_local_data(self.config.data, text_column=self.config.text_column,
                                                label_column=self.config.label_column, task=task,
                                                label_names=label_names)
                self._data_key = key
            except ValueError as exc:
                raise AssignmentRefused(FR.FAILURE_REASON_DATA, str(exc)) from None
            log.info("local data: %d examples, %s", len(self._dataset),
                     "prompt -> response pairs" if isinstance(self._dataset, InstructionDataset)
                     else f"{self._dataset.num_labels} labels",
                     extra={"event": "data", "examples": len(self._dataset)})
        return self._dataset

    def _get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from raffm.models import resolve_model

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.config.model))
            except (OSError, ValueError) as exc:
                raise AssignmentRefused(FR.FAILURE_REASON_OTHER, f"cannot load the tokenizer from --model "
                                                                 f"{self.config.model!r}: {exc}") from None
        return self._tokenizer
