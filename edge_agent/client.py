"""The agent's transport: gRPC channels (plaintext, TLS or mTLS), bearer-token metadata, deadlines, and retries with
exponential backoff and jitter.

Every unary call has a deadline (``rpc_timeout_s``); a call that fails with a transient status (the service is down,
overloaded or slow) is retried after a growing, jittered delay until it succeeds or the agent is stopped, and the
agent logs what it is waiting for. Permanent errors (bad input, auth, "round closed") surface at once as
:class:`ServiceError`. Streams are not retried here: the transfer layer resumes them from where they broke.

:class:`FaultInjector` is a test hook in this layer (never in the servers): it breaks a download or upload stream
after N chunks or corrupts one downloaded chunk, exactly as a flaky link would.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from edge_agent.config import AgentConfig
from raffm.chunkwire import DOWNLOAD, UPLOAD
from raffm.v1 import aggregator_pb2, aggregator_pb2_grpc, extractor_pb2, extractor_pb2_grpc, registry_pb2_grpc

log = logging.getLogger("edge_agent.client")

MiB = 1 << 20
MAX_MESSAGE_BYTES = 64 * MiB  # matches the services; chunks are ~1 MiB and the limit counts framing
ERROR_DETAIL_KEY = "raffm-error-bin"
# Statuses worth retrying: the service is unreachable, overloaded, or did not answer in time.
TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
     grpc.StatusCode.ABORTED}
)
# A broken stream shows up as one of these; the transfer layer then resumes.
STREAM_BROKEN = TRANSIENT | {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

T = TypeVar("T")


class Stopped(Exception):
    """The agent was asked to stop while waiting or transferring."""


class ServiceError(Exception):
    """A call failed with a status that retrying will not fix; ``code`` is the gRPC status code."""

    def __init__(self, what: str, code: grpc.StatusCode, details: str, reason: str = "") -> None:
        super().__init__(f"{what} failed: {code.name}: {details}")
        self.what = what
        self.code = code
        self.details = details
        self.reason = reason  # ErrorDetail.reason from the server, when it sent one


def error_reason(err: grpc.RpcError) -> str:
    """The ``raffm.v1.ErrorDetail.reason`` a server attached to a failed call, or ''."""
    try:
        trailing = err.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - injected errors and some failures have no metadata
        return ""
    from raffm.v1 import common_pb2

    for key, value in trailing:
        if key == ERROR_DETAIL_KEY and isinstance(value, bytes):
            try:
                return common_pb2.ErrorDetail.FromString(value).reason
            except Exception:  # noqa: BLE001
                return ""
    return ""


def status_of(err: BaseException) -> grpc.StatusCode:
    code = getattr(err, "code", None)
    if callable(code):
        try:
            value = code()
            if isinstance(value, grpc.StatusCode):
                return value
        except Exception:  # noqa: BLE001
            pass
    return grpc.StatusCode.UNKNOWN


def details_of(err: BaseException) -> str:
    details = getattr(err, "details", None)
    if callable(details):
        try:
            return str(details() or "")
        except Exception:  # noqa: BLE001
            pass
    return str(err)


class Backoff:
    """Exponential backoff with jitter: the n-th delay is uniform in [d/2, d], d = min(max, initial * 2**n)."""

    def __init__(self, initial_s: float, max_s: float, *, rng: random.Random | None = None) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(f"backoff needs 0 < initial ({initial_s}) <= max ({max_s})")
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.initial_s * (2.0 ** min(self.attempt, 60)))
        self.attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class _StopWatcher:
    """One thread per process that turns stop requests into set events and cancelled calls.

    :meth:`Stopper.stop` only sets a flag and writes a byte to a pipe (a system call, no Python lock, so a signal
    handler may do it); the thread sleeps in ``read`` on the pipe, so it costs nothing until a stop comes, however
    many agents share the process. (A thread per agent that looked at its flag 20 times a second cost a tenth of a
    core per 250 agents, a simulator's whole idle fleet.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stoppers: set[Stopper] = set()
        self._pid = 0
        self._read_fd = self._write_fd = -1
        self._thread: threading.Thread | None = None

    def add(self, stopper: Stopper) -> None:
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child: the parent's thread is not ours
                self._read_fd, self._write_fd = os.pipe()
                os.set_blocking(self._write_fd, False)
                self._pid, self._thread, self._stoppers = os.getpid(), None, set()
            self._stoppers.add(stopper)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(self._read_fd,), name="agent-stopper",
                                                daemon=True)
                self._thread.start()
        self.poke()  # a stop requested before the agent started

    def discard(self, stopper: Stopper) -> None:
        with self._lock:
            self._stoppers.discard(stopper)

    def poke(self) -> None:
        """Wake the thread. Safe in a signal handler; a full pipe already holds a wake-up."""
        if self._pid == os.getpid():
            try:
                os.write(self._write_fd, b"\0")
            except BlockingIOError:
                pass

    def _run(self, read_fd: int) -> None:
        while True:
            os.read(read_fd, 4096)
            with self._lock:
                due = [s for s in self._stoppers if s.stopped]
                self._stoppers.difference_update(due)
            for s in due:  # outside the lock: an Event.set may wait for code the signal interrupted
                s.event.set()
                s._run_callbacks()  # noqa: SLF001


class Stopper:
    """The agent's stop flag. :meth:`stop` takes no lock, so a signal handler may call it, also one that interrupts
    another handler or code holding a lock (``threading.Event.set`` takes one: a second SIGTERM arriving inside the
    first one's ``set()`` used to deadlock the agent). The process's watcher thread (:class:`_StopWatcher`) turns
    the flag into the event that sleepers wait on, and runs the registered cancel callbacks (cancelling an in-flight
    RPC from inside a signal handler could deadlock the interrupted code)."""

    _watcher = _StopWatcher()

    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next = 0
        self.reason = ""
        self._requested = False

    @property
    def stopped(self) -> bool:
        return self._requested

    def stop(self, reason: str = "stop requested") -> None:
        """Safe from a signal handler: sets a flag and wakes the watcher (no lock). From any other thread than the
        main one (no handler can interrupt it there), the event is set at once as well."""
        if self._requested:
            return
        self.reason = reason
        self._requested = True
        if threading.current_thread() is not threading.main_thread():
            self.event.set()
        self._watcher.poke()

    def start_watcher(self) -> None:
        """Let the process's watcher act on this stopper's stop (the agent has started)."""
        self._watcher.add(self)

    def close(self) -> None:
        """The agent has finished: the watcher forgets this stopper; a later :meth:`start_watcher` adds it again."""
        self._watcher.discard(self)

    def _run_callbacks(self) -> None:
        with self._lock:
            callbacks = list(self._callbacks.values())
        for cb in callbacks:
            try:
                cb()
            except Exception:  # noqa: BLE001 - cancellation is best effort
                log.debug("cancel callback failed", exc_info=True)

    def on_stop(self, callback: Callable[[], None]) -> int:
        """Run ``callback`` when the agent stops (at once if it already has); returns a handle for :meth:`remove`."""
        with self._lock:
            handle = self._next
            self._next += 1
            self._callbacks[handle] = callback
        if self._requested:
            callback()  # cancellation is idempotent, so a second call from the watcher is harmless
        return handle

    def remove(self, handle: int) -> None:
        with self._lock:
            self._callbacks.pop(handle, None)

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; raise :class:`Stopped` if the agent is stopped meanwhile."""
        self.check()
        if self.event.wait(max(0.0, seconds)) or self._requested:
            raise Stopped(self.reason)

    def check(self) -> None:
        if self._requested:
            raise Stopped(self.reason)


# ----------------------------------------------------------------------------------------------------- faults


class InjectedFault(grpc.RpcError):
    """What the fault injector raises: looks like a connection that broke mid-stream (UNAVAILABLE)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._message


@dataclass
class FaultInjector:
    """Test hook: deterministic transport faults, each fired once.

    ``break_download_after``: the download stream breaks after delivering that many chunks;
    ``corrupt_download_chunk``: the chunk with that index (0-based, counted over the first stream) has a byte flipped;
    ``break_upload_after``: the upload stream is cut after sending that many chunks.
    ``events`` records what fired, for assertions.
    """

    break_download_after: int | None = None
    corrupt_download_chunk: int | None = None
    break_upload_after: int | None = None
    events: list[str] = field(default_factory=list)

    def wrap_download(self, stream: Iterator[Any], cancel: Callable[[], None]) -> Iterator[Any]:
        chunks = 0
        for msg in stream:
            if msg.WhichOneof("body") == "chunk":
                if self.corrupt_download_chunk is not None and chunks == self.corrupt_download_chunk:
                    self.corrupt_download_chunk = None
                    data = bytearray(msg.chunk.data)
                    data[len(data) // 2] ^= 0xFF
                    msg = type(msg)(chunk=type(msg.chunk)(tensor=msg.chunk.tensor, offset=msg.chunk.offset,
                                                          data=bytes(data)))
                    self.events.append(f"corrupted download chunk {chunks} of {msg.chunk.tensor}")
                if self.break_download_after is not None and chunks == self.break_download_after:
                    self.break_download_after = None
                    cancel()
                    self.events.append(f"broke download after {chunks} chunks")
                    raise InjectedFault(f"injected: download stream broken after {chunks} chunks")
                chunks += 1
            yield msg

    def wrap_upload(self, messages: Iterator[Any], cancel: Callable[[], None], done: threading.Event,
                    held: Callable[[], int] | None = None) -> Iterator[Any]:
        """``held()``: bytes the receiver already stored; the cut waits (up to 10 s) until it is > 0, so the
        test sees a resume from the middle deterministically, whatever the thread scheduling."""
        chunks = 0
        for msg in messages:
            if msg.WhichOneof("body") == "chunk":
                if self.break_upload_after is not None and chunks == self.break_upload_after:
                    self.break_upload_after = None
                    deadline = time.monotonic() + 10.0
                    while held is not None and held() == 0 and time.monotonic() < deadline:
                        time.sleep(0.02)
                    self.events.append(f"broke upload after {chunks} chunks")
                    cancel()
                    done.wait(10.0)  # end the request stream only once the call is dead (no clean half-close)
                    return
                chunks += 1
            yield msg


# ----------------------------------------------------------------------------------------------------- channels


def channel_options(config: AgentConfig) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.enable_retries", 0),  # retries are ours, with logging and resume
        # reconnect promptly once a service comes back, instead of gRPC's own long backoff
        ("grpc.initial_reconnect_backoff_ms", int(config.backoff_initial_s * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(config.backoff_initial_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(config.backoff_max_s * 1000)),
        # Each agent its own connection, also when a simulator runs many agents in one process (gRPC would
        # otherwise share one subchannel per target, so a fleet behind a load balancer would reach one backend).
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if config.tls_server_name:
        opts.append(("grpc.ssl_target_name_override", config.tls_server_name))
    return opts


# The agent's stubs are the generated ones, except that the chunk streams go through raffm.chunkwire: a slice's
# chunks arrive as views of the received bytes, and an update's chunks (ChunkMessage, from upload_messages) are
# encoded with one copy. The bytes on the wire are protobuf's.


def extractor_stub(channel: grpc.Channel) -> extractor_pb2_grpc.ExtractorServiceStub:
    stub = extractor_pb2_grpc.ExtractorServiceStub(channel)
    stub.DownloadSlice = channel.unary_stream(  # type: ignore[method-assign]
        "/raffm.v1.ExtractorService/DownloadSlice", request_serializer=extractor_pb2.DownloadRequest.SerializeToString,
        response_deserializer=DOWNLOAD.deserialize)
    return stub


def aggregator_stub(channel: grpc.Channel) -> aggregator_pb2_grpc.AggregatorServiceStub:
    stub = aggregator_pb2_grpc.AggregatorServiceStub(channel)
    stub.UploadUpdate = channel.stream_unary(  # type: ignore[method-assign]
        "/raffm.v1.AggregatorService/UploadUpdate", request_serializer=UPLOAD.serialize,
        response_deserializer=aggregator_pb2.UploadAck.FromString)
    return stub


def make_channel(target: str, config: AgentConfig) -> grpc.Channel:
    """A channel to ``target``: TLS when a CA or client certificate is configured, plaintext otherwise."""
    if config.tls:
        def read(path: str) -> bytes | None:
            return Path(path).expanduser().read_bytes() if path else None

        creds = grpc.ssl_channel_credentials(
            root_certificates=read(config.tls_ca), private_key=read(config.tls_key),
            certificate_chain=read(config.tls_cert),
        )
        return grpc.secure_channel(target, creds, options=channel_options(config))
    return grpc.insecure_channel(target, options=channel_options(config))


class ServiceClient:
    """Stubs for the three services with the device's token, deadlines and retry-until-stopped for unary calls."""

    def __init__(self, config: AgentConfig, stopper: Stopper, *, faults: FaultInjector | None = None) -> None:
        self.config = config
        self.stopper = stopper
        self.faults = faults
        self.token = ""
        self.retries = 0  # transient failures retried so far (for status and tests)
        # Called after every unary attempt with (what, seconds, ok): a simulator's latency recorder.
        self.observer: Callable[[str, float, bool], None] | None = None
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, target: str) -> grpc.Channel:
        with self._lock:
            if target not in self._channels:
                self._channels[target] = make_channel(target, self.config)
            return self._channels[target]

    @property
    def registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        return registry_pb2_grpc.RegistryServiceStub(self.channel(self.config.registry))

    @property
    def aggregator(self) -> aggregator_pb2_grpc.AggregatorServiceStub:
        return aggregator_stub(self.channel(self.config.aggregator))

    def extractor(self, target: str = "") -> extractor_pb2_grpc.ExtractorServiceStub:
        return extractor_stub(self.channel(target or self.config.extractor))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            ch.close()

    def call(
        self,
        what: str,
        method: Callable[..., T],
        request: Any,
        *,
        target: str = "",
        retry: bool = True,
        timeout_s: float | None = None,
        authenticated: bool = True,
        max_attempts: int = 0,
    ) -> T:
        """Call a unary ``method``; retry transient failures with backoff until it succeeds or the agent stops.

        ``max_attempts`` > 0 bounds the attempts (then the last transient error is raised as ServiceError).
        """
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        attempt = 0
        while True:
            self.stopper.check()
            attempt += 1
            started = time.perf_counter()
            try:
                future = method.future(  # type: ignore[attr-defined]
                    request, timeout=timeout_s or self.config.rpc_timeout_s,
                    metadata=self.metadata() if authenticated else (),
                )
                handle = self.stopper.on_stop(future.cancel)
                try:
                    result = future.result()
                    if self.observer is not None:
                        self.observer(what, time.perf_counter() - started, True)
                    return result  # type: ignore[no-any-return]
                except grpc.FutureCancelledError:
                    raise Stopped(self.stopper.reason) from None
                finally:
                    self.stopper.remove(handle)
            except grpc.RpcError as err:
                if self.observer is not None:
                    self.observer(what, time.perf_counter() - started, False)
                code = status_of(err)
                if code == grpc.StatusCode.CANCELLED and self.stopper.stopped:
                    raise Stopped(self.stopper.reason) from None
                if not retry or code not in TRANSIENT or (max_attempts and attempt >= max_attempts):
                    raise ServiceError(what, code, details_of(err), error_reason(err)) from None
                delay = backoff.next_delay()
                self.retries += 1
                log.warning(
                    "waiting for %s at %s: %s (%s); attempt %d, retrying in %.1fs",
                    what.split(".")[0], target or what, code.name, details_of(err)[:200], attempt, delay,
                    extra={"event": "retry", "call": what, "code": code.name, "attempt": attempt,
                           "retry_in_s": round(delay, 2)},
                )
                self.stopper.wait(delay)
