"""Slice download and update upload throughput over the real services, against a raw loopback socket.

Starts a registry, an extractor and an aggregator on 127.0.0.1 (in the bench's process, real SQLite and a checkpoint
directory; with ``--extractor-process`` the extractor runs as its own process, as deployed), registers one device
whose profile fits the whole model, then times:
  - DownloadSlice (server stream, manifest + ~1 MiB chunks, sha256 verified on receipt);
  - UploadUpdate (client stream, staged to disk with fsync, validated and folded);
  - a raw TCP socket on 127.0.0.1 moving the same number of bytes in 1 MiB sendall() calls (the baseline);
  - the raw disk under the aggregator's data directory: the upload's bytes written to one file in 1 MiB writes and
    fsynced once (the floor of a durable upload, which cannot beat its disk);
and, through a byte-counting TCP relay, the wire overhead = bytes on the socket / tensor bytes.
With ``--concurrency 1,8,32``, N devices also download and then upload at once (one thread and channel each): the
aggregate MB/s and the peak memory of the process over its level before the transfers (the client side holds no
tensors: its payload is one shared buffer of zeros), which must stay O(model), not O(model x devices).

    .venv/bin/python bench/bench_transfer.py [--hidden 768 --layers 6] [--wire-dtype fp32] [--chunk-kib 1024]
        [--repeat 3] [--breakdown] [--concurrency 1,8,32] [--extractor-process] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MiB = 1 << 20


def raw_socket_mb_s(nbytes: int, block: int = MiB) -> float:
    """Bytes/s of one TCP connection on 127.0.0.1 moving ``nbytes`` in ``block``-sized sendall calls."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    done = threading.Event()

    def receive() -> None:
        conn, _ = server.accept()
        buf = bytearray(block)
        view = memoryview(buf)
        left = nbytes
        while left:
            n = conn.recv_into(view, min(block, left))
            if n == 0:
                break
            left -= n
        conn.close()
        done.set()

    t = threading.Thread(target=receive)
    t.start()
    payload = memoryview(bytes(block))
    client = socket.create_connection(("127.0.0.1", port))
    start = time.perf_counter()
    left = nbytes
    while left:
        n = min(block, left)
        client.sendall(payload[:n])
        left -= n
    done.wait()
    elapsed = time.perf_counter() - start
    client.close()
    server.close()
    t.join()
    return nbytes / elapsed / 1e6


def raw_disk_mb_s(nbytes: int, directory: Path, block: int = MiB, keep: bool = False) -> float:
    """Bytes/s of writing ``nbytes`` to one new file in ``directory`` in ``block``-sized writes, then one fsync.

    ``keep`` leaves the file in place, as a staged upload stays until its round ends: a virtual disk writes blocks it
    has never held several times slower than blocks a deleted file freed (here 350 against 1,650 MB/s), so the floor
    of an upload is measured on new blocks when the upload's are new."""
    import os

    payload = memoryview(bytes(block))
    path = directory / f"raw-disk-{time.monotonic_ns()}"
    try:
        start = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            left = nbytes
            while left:
                n = min(block, left)
                f.write(payload[:n])
                left -= n
            os.fsync(f.fileno())
        elapsed = time.perf_counter() - start
    finally:
        if not keep:
            path.unlink(missing_ok=True)
    return nbytes / elapsed / 1e6


class CountingRelay:
    """A TCP relay on 127.0.0.1 that counts the bytes it forwards in each direction."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.up = 0  # client -> server
        self.down = 0  # server -> client
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the target has gone (a client reconnecting during teardown): refuse it too
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        buf = bytearray(MiB)
        try:
            while n := src.recv_into(buf):
                dst.sendall(memoryview(buf)[:n])
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + n)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def reset(self) -> None:
        with self._lock:
            self.up = self.down = 0

    def close(self) -> None:
        """Stop accepting (``shutdown`` wakes the blocked ``accept``, which a plain ``close`` does not)."""
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()


class ZeroPayload:
    """An update of zeros in the download's manifest shapes, produced tensor by tensor."""

    def __init__(self, manifest: Any, frozen: frozenset[str] = frozenset()) -> None:
        from raffm.wire import Manifest, TensorMeta

        # Frozen tensors (the recipe's vocabulary) are downloaded but never uploaded.
        self.manifest = Manifest(tuple(
            TensorMeta(m.name, m.dtype, m.shape, m.nbytes, hashlib.sha256(bytes(m.nbytes)).digest())
            for m in manifest.tensors if m.name not in frozen))
        self.nbytes = self.manifest.total_bytes

    def source(self, meta: Any) -> bytes:
        return _zeros(meta.nbytes)


@functools.lru_cache(maxsize=None)
def _zeros(nbytes: int) -> bytes:
    """One immutable buffer of zeros per size, shared by every concurrent upload."""
    return bytes(nbytes)


class PeakMemory:
    """Samples this process's resident memory every 10 ms in a thread: the peak of VmRSS (everything resident,
    file pages of mmapped staging files included) and of RssAnon (heap and anonymous memory: what would grow if
    the aggregator held every upload) above their level at the start, in MB."""

    FIELDS = ("VmRSS", "RssAnon")

    def __init__(self) -> None:
        self.base = self._read()
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def _read(cls) -> dict[str, int]:
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in cls.FIELDS:
                values[key] = int(rest.split()[0]) * 1024
        return values

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for key, value in self._read().items():
                self.peak[key] = max(self.peak[key], value)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def growth_mb(self) -> dict[str, float]:
        return {key: (self.peak[key] - self.base[key]) / 1e6 for key in self.FIELDS}


def concurrently(jobs: list[Any]) -> float:
    """Run every callable in its own thread at once; the wall time in seconds. Re-raises the first error."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs) + 1)

    def run(job: Any) -> None:
        start.wait()
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def breakdown(state: dict[str, Any], frozen: frozenset[str], chunk: int, repeat: int) -> list[tuple[str, float]]:
    """Each stage of the two paths alone, on the upload's tensors (best of ``repeat``): MB/s of tensor bytes.

    The stages run one after another in the real paths (the upload's writes and hashes overlap its receiving), so
    the slowest ones bound the throughput; gRPC's transport itself is what the end-to-end figures add on top.
    """
    import os

    import torch

    from raffm.aggregation import SlicedFedAvg
    from raffm.chunkwire import UPLOAD
    from raffm.reassembly import Reassembler
    from raffm.slicing import TensorSlice
    from raffm.v1 import aggregator_pb2, common_pb2
    from raffm.wire import WirePayload, iter_chunks
    from services.aggregator.staging import Staging

    tensors = {n: t for n, t in state.items() if n not in frozen and t.is_floating_point()}
    payload = WirePayload.from_state(tensors, "float32")
    nbytes = payload.nbytes
    plan = {n: TensorSlice(tuple(t.shape), tuple(t.shape), tuple(t.shape), tuple(t.shape)) for n, t in tensors.items()}
    results: list[tuple[str, float]] = []

    def best(name: str, fn: Any) -> Any:
        out, fastest = None, float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            fastest = min(fastest, time.perf_counter() - t0)
        results.append((name, nbytes / fastest / 1e6))
        return out

    def encode() -> list[bytes]:
        return [UPLOAD.encode(c) for c in iter_chunks(payload.manifest, payload.source, chunk_bytes=chunk)]

    wire = best("chunk + encode (sender, raffm.chunkwire)", encode)
    best("protobuf encode instead (3 copies more)", lambda: [aggregator_pb2.UploadMessage(chunk=common_pb2.TensorChunk(
        tensor=c.tensor, offset=c.offset, data=bytes(c.data))).SerializeToString()
        for c in iter_chunks(payload.manifest, payload.source, chunk_bytes=chunk)])
    parsed = best("decode (receiver, views)", lambda: [UPLOAD.deserialize(m).chunk for m in wire])
    best("sha256 (verify)", lambda: [hashlib.sha256(payload.source(m)).digest() for m in payload.manifest.tensors])
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        staging, count = Staging(tmp), iter(range(1 << 30))

        def stage(sync: bool) -> Any:
            staged = staging.upload("r", f"t{next(count)}")
            staged.save_manifest(payload.manifest)
            r = Reassembler(payload.manifest, staged)
            for c in parsed:
                r.accept(c.tensor, c.offset, c.data)
            if sync:
                staged.sync()
            return staged

        def raw_disk() -> None:  # the floor of a durable upload: the same bytes, 1 MiB writes, one fsync
            with open(Path(tmp) / f"raw{next(count)}", "wb", buffering=0) as f:
                for c in parsed:
                    f.write(c.data)
                os.fsync(f.fileno())

        best("raw disk: write + fsync, one file (floor)", raw_disk)
        best("stage: write + sha256, no fsync", lambda: stage(False))
        staged = best("stage: write + sha256 + fsync (commit)", lambda: stage(True))
        agg = SlicedFedAvg(tensors, accum_dtype=torch.float32)
        best("validate (finite) from staged mmap", lambda: agg.validate(staged.tensors(), plan, 1.0))
        best("validate + fold from staged mmap", lambda: agg.fold(staged.tensors(), plan, 1.0))
    return results


def concurrent_transfers(group: list[Any], ext_port: int, agg_port: int, options: list[Any], chunk: int,
                         payload: ZeroPayload) -> dict[str, float]:
    """``len(group)`` devices download their slices at once, then upload ``payload`` at once, each on its own
    channel: aggregate tensor MB/s of each phase and the process's peak memory growth during it."""
    import grpc

    from edge_agent.client import aggregator_stub, extractor_stub
    from edge_agent.transfer import download_once, upload_once
    from raffm.reassembly import HashOnlySink

    n = len(group)
    down_bytes = 0

    def download(md: Any, a: Any) -> None:
        nonlocal down_bytes
        stub = extractor_stub(grpc.insecure_channel(f"127.0.0.1:{ext_port}", options=options))
        d = download_once(stub, a.ticket, HashOnlySink(), metadata=md, chunk_bytes=chunk)
        d.reassembler.finish()
        down_bytes = d.manifest.total_bytes

    def upload(md: Any, a: Any) -> None:
        stub = aggregator_stub(grpc.insecure_channel(f"127.0.0.1:{agg_port}", options=options))
        assert upload_once(stub, a.ticket, 1, payload, metadata=md, chunk_bytes=chunk).accepted  # type: ignore[arg-type]

    row: dict[str, float] = {"devices": n}
    for phase, fn in (("download", download), ("upload", upload)):
        with PeakMemory() as memory:
            seconds = concurrently([functools.partial(fn, md, a) for (_, md), a in group])
        nbytes = down_bytes if phase == "download" else payload.nbytes
        growth = memory.growth_mb()
        row |= {f"{phase}_mb_s": n * nbytes / seconds / 1e6, f"{phase}_rss_mb": growth["VmRSS"],
                f"{phase}_anon_mb": growth["RssAnon"]}
    return row


# The in-process job's settings an aggregator process gets as flags (the rest are its defaults either way).
_PROCESS_JOB_FLAGS = ("job_id", "rounds", "clients_per_round", "quorum", "wire_dtype", "ordering", "accum_dtype",
                      "round_deadline_s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--wire-dtype", default="fp32")
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a small model (hidden 256, 2 layers), 2 repeats")
    parser.add_argument("--json", type=Path, help="also write the measured figures to this JSON file")
    parser.add_argument("--concurrency", default="",
                        help="comma-separated device counts (e.g. 1,8,32) that also download and then upload at once: "
                             "aggregate MB/s and peak memory per count")
    parser.add_argument("--extractor-process", action="store_true",
                        help="run the extractor as its own process (`raffm extractor serve`), as deployed, instead of "
                             "in the bench's process beside the client; the memory figures then leave it out")
    parser.add_argument("--aggregator-process", action="store_true",
                        help="run the aggregator as its own process too (`raffm aggregator serve`, the model saved as "
                             "a folder), so an upload measures the service without the client in its interpreter; "
                             "the memory figures then leave it out")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each stage alone (encode, decode, sha256, staging, fsync, fold) on the same "
                             "tensors, to see where the time goes")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.repeat = 256, 2, 2
    levels = [int(n) for n in args.concurrency.split(",") if n.strip()]
    if any(n < 1 for n in levels):
        parser.error(f"--concurrency {args.concurrency!r}: every device count must be >= 1")
    devices_needed = args.repeat + 2 + sum(levels)

    import grpc
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from edge_agent.client import aggregator_stub, extractor_stub
    from edge_agent.transfer import download_once, upload_once
    from raffm.planning import cost_model_for
    from raffm.proto import recipe_from_proto
    from raffm.reassembly import HashOnlySink
    from raffm.v1 import aggregator_pb2, aggregator_pb2_grpc
    from raffm_app.processes import ProcessGroup, raffm_command, serve_on_free_ports, wait_serving
    from services.aggregator.app import AggregatorConfig, build_aggregator
    from services.aggregator.config import JobConfig
    from services.common.auth import auth_metadata, fleet_verifier
    from services.common.server import ServerConfig
    from services.common.testing import LoopThread
    from services.extractor.app import ExtractorConfig, build_extractor
    from services.registry.testing import OPERATOR_TOKEN, RegistryHarness

    secret = "bench-ticket-secret-0123456789"
    config = BertConfig(vocab_size=30522, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden).to_dict()
    config["model_type"] = "bert"

    torch.set_num_threads(1)  # like the services' folds on a small machine; keeps the figures comparable

    def initial() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        g = torch.Generator().manual_seed(0)
        shapes = cost_model_for(config).shapes
        return {n: torch.empty(s).uniform_(-0.05, 0.05, generator=g) for n, s in shapes.items()}, config

    options = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
    raw_before = max(raw_socket_mb_s(1 << 28) for _ in range(2))  # before any service starts: a quiet process
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        registry = RegistryHarness(f"sqlite:///{root / 'registry.db'}").start()
        loop = LoopThread()
        job = JobConfig(job_id="bench", model="synthetic", rounds=1, clients_per_round=devices_needed,
                        quorum=devices_needed, wire_dtype=args.wire_dtype, ordering="never",
                        accum_dtype="float32", round_deadline_s=3600)

        store = f"file://{root / 'agg' / 'checkpoints'}"
        processes = ProcessGroup(root / "logs", grace_s=5)

        async def start() -> tuple[Any, Any]:
            verifier = fleet_verifier(registry.address, OPERATOR_TOKEN)
            ext = None
            if not args.extractor_process:
                ext = await build_extractor(ExtractorConfig(store, secret), verifier=verifier)
                await ext.server.start()
            agg = None
            if not args.aggregator_process:
                agg = await build_aggregator(AggregatorConfig(job=job, data_dir=str(root / "agg"),
                                                              ticket_secret=secret, registry_target=registry.address,
                                                              operator_token=OPERATOR_TOKEN,
                                                              server=ServerConfig(grace_s=1.0)),
                                             verifier=verifier, initial_model=initial)
                await agg.server.start()
            return ext, agg

        ext, agg = loop.run(start(), timeout=600)
        try:
            if agg is None:  # as deployed: the job's model from a folder, the same job settings as flags
                model_dir = root / "model"
                BertForSequenceClassification(BertConfig(**config)).save_pretrained(model_dir)
                processes.start("aggregator", raffm_command(
                    "aggregator", "serve", "--data-dir", str(root / "agg"), "--store", store, "--registry",
                    registry.address, *serve_on_free_ports(processes, "aggregator"), "--operator-token",
                    OPERATOR_TOKEN, "--ticket-secret", secret, "--log-level", "WARNING", "--grace-s", "1",
                    "--model", str(model_dir), *(f"--{k.replace('_', '-')}={v}" for k, v in job.to_dict().items()
                                                 if k in _PROCESS_JOB_FLAGS)))
                agg_port = wait_serving(processes, "aggregator")["grpc"]
            else:
                agg_port = agg.server.port
            if ext is None:  # as deployed: its own process and interpreter
                processes.start("extractor", raffm_command(
                    "extractor", "serve", "--store", store, "--registry", registry.address,
                    *serve_on_free_ports(processes, "extractor"), "--operator-token", OPERATOR_TOKEN,
                    "--ticket-secret", secret, "--log-level", "WARNING"))
                ext_port = wait_serving(processes, "extractor")["grpc"]
            else:
                ext_port = ext.server.port
            relay_ext, relay_agg = CountingRelay(ext_port), CountingRelay(agg_port)
            chunk = args.chunk_kib * 1024
            downs, ups, disks, tensor_bytes, upload_bytes = [], [], [], 0, 0
            overhead_down = overhead_up = 0.0
            # Every device registers and polls before any transfer, one more than upload: the round stays open
            # (a round whose every assigned device is done closes at once, and its aggregation would compete with
            # the timed transfers for the CPU).
            devices = []
            for i in range(devices_needed):
                reply = registry.register(f"bench{i}", train_memory_mb=1 << 20, gflops=1e5, up_mbps=1e5,
                                          down_mbps=1e5, tier="server")
                devices.append((reply.device_id, auth_metadata(reply.token)))
            plain = aggregator_pb2_grpc.AggregatorServiceStub(grpc.insecure_channel(f"127.0.0.1:{agg_port}",
                                                                                    options=options))
            assignments = [plain.PollRound(aggregator_pb2.PollRequest(device_id=dev), metadata=md,
                                           timeout=60).assignment for dev, md in devices]
            timed = args.repeat + 1
            for i, ((_, md), a) in enumerate(zip(devices[:timed], assignments[:timed], strict=True)):
                assert a.ticket, "a device got no assignment"
                via_relay = i == args.repeat  # last iteration: through the counting relay, not timed
                ext_target = f"127.0.0.1:{relay_ext.port if via_relay else ext_port}"
                agg_target = f"127.0.0.1:{relay_agg.port if via_relay else agg_port}"
                astub = aggregator_stub(grpc.insecure_channel(agg_target, options=options))
                estub = extractor_stub(grpc.insecure_channel(ext_target, options=options))  # the agent's
                relay_ext.reset()
                relay_agg.reset()
                t0 = time.perf_counter()
                d = download_once(estub, a.ticket, HashOnlySink(), metadata=md, chunk_bytes=chunk)
                d.reassembler.finish()
                down_s = time.perf_counter() - t0
                tensor_bytes = d.manifest.total_bytes
                frozen = recipe_from_proto(a.recipe).frozen
                payload = ZeroPayload(d.manifest, frozen)
                upload_bytes = payload.nbytes
                t0 = time.perf_counter()
                ack = upload_once(astub, a.ticket, 1, payload, metadata=md, chunk_bytes=chunk)  # type: ignore[arg-type]
                up_s = time.perf_counter() - t0
                assert ack.accepted
                if via_relay:
                    overhead_down = (relay_ext.down + relay_ext.up) / tensor_bytes
                    overhead_up = (relay_agg.up + relay_agg.down) / upload_bytes
                elif i > 0:  # the first pass warms the slice cache and the page cache
                    downs.append(tensor_bytes / down_s / 1e6)
                    ups.append(upload_bytes / up_s / 1e6)
                    # The disk alone, right after, in the upload's conditions (its file kept, as staged uploads are).
                    disks.append(raw_disk_mb_s(upload_bytes, root / "agg", keep=True))
            concurrent = []
            first = timed
            for n in levels:  # the last device stays idle: the round stays open
                group = list(zip(devices[first:first + n], assignments[first:first + n], strict=True))
                first += n
                concurrent.append(concurrent_transfers(group, ext_port, agg_port, options, chunk, payload))
            raw = max(raw_before, *(raw_socket_mb_s(tensor_bytes) for _ in range(2)))
            relay_ext.close()
            relay_agg.close()
        finally:
            processes.stop()
            if agg is not None:
                loop.run(agg.server.stop(1.0))
            if ext is not None:
                loop.run(ext.server.stop(1.0))
            loop.close()
            registry.stop()

    down, up, disk = max(downs), max(ups), max(disks)
    print(f"model: BERT hidden={args.hidden} layers={args.layers}, slice = full model, "
          f"{tensor_bytes / 1e6:.1f} MB in {args.wire_dtype} down, {upload_bytes / 1e6:.1f} MB up (frozen tensors "
          f"are not uploaded), chunk {args.chunk_kib} KiB, extractor "
          f"{'in its own process' if args.extractor_process else 'in the bench process'}, aggregator "
          f"{'in its own process' if args.aggregator_process else 'in the bench process'}")
    print(f"raw loopback socket          : {raw:8.0f} MB/s  (baseline, same bytes, same run)")
    print(f"raw disk (1 file, 1 fsync)   : {disk:8.0f} MB/s  (floor of a durable upload: its bytes, after each upload)")
    print(f"DownloadSlice (verify sha256): {down:8.0f} MB/s  ratio {down / raw:.2f} of raw socket")
    print(f"UploadUpdate  (stage+fsync+fold): {up:5.0f} MB/s  ratio {up / raw:.2f} of raw socket, "
          f"{up / min(raw, disk):.2f} of the slower of socket and disk")
    print(f"wire overhead download: {overhead_down:.4f} (bytes on socket / tensor bytes, both directions)")
    print(f"wire overhead upload  : {overhead_up:.4f}")
    for row in concurrent:
        print(f"{row['devices']:3d} devices at once: download {row['download_mb_s']:6.0f} MB/s "
              f"({row['download_mb_s'] / raw:.2f} of raw socket), peak +{row['download_rss_mb']:.0f} MB RSS "
              f"(+{row['download_anon_mb']:.0f} MB anonymous); upload {row['upload_mb_s']:6.0f} MB/s "
              f"({row['upload_mb_s'] / raw:.2f}), peak +{row['upload_rss_mb']:.0f} MB RSS "
              f"(+{row['upload_anon_mb']:.0f} MB anonymous); aggregate of all devices' tensor bytes")
    stages: list[tuple[str, float]] = []
    if args.breakdown:
        state, _ = initial()
        stages = breakdown(state, frozen, args.chunk_kib * 1024, max(2, args.repeat))
        print("where the time goes (each stage alone on the upload's tensors, best of the repeats):")
        for name, mb_s in stages:
            print(f"  {name:42s}: {mb_s:8.0f} MB/s  ratio {mb_s / raw:.2f} of raw socket")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "bench": "bench_transfer", "hidden": args.hidden, "layers": args.layers, "wire_dtype": args.wire_dtype,
            "chunk_kib": args.chunk_kib, "extractor_process": args.extractor_process,
            "aggregator_process": args.aggregator_process, "tensor_bytes": tensor_bytes,
            "upload_bytes": upload_bytes, "raw_socket_mb_s": raw,
            "raw_disk_mb_s": disk, "upload_ratio_of_floor": up / min(raw, disk),
            "download_mb_s": down, "upload_mb_s": up, "download_ratio": down / raw, "upload_ratio": up / raw,
            "wire_overhead_download": overhead_down, "wire_overhead_upload": overhead_up,
            "download_runs_mb_s": downs, "upload_runs_mb_s": ups, "raw_disk_runs_mb_s": disks,
            "breakdown_mb_s": dict(stages), "concurrent": concurrent}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
