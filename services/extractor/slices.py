"""The extractor's use cases: plan a sub-model for a profile, and serve the wire payload of a ticket's slice.

Slices are cut from a model version in the checkpoint store, converted to the job's wire dtype (the recipe's frozen
tensors narrower where it says so, :meth:`raffm.recipe.Recipe.download_dtypes`), hashed, and kept in a bounded LRU
cache keyed by (version, spec key, wire dtype, LoRA settings, frozen tensors' precision); concurrent
requests for the same slice build it once.

A LoRA ticket (its recipe has a rank) gets the slice of its *base* version (the job's version 0: the same bytes, so the
same sha256, every round, and a device's tensor cache skips them after its first round) plus the adapters that carry
its slice of ``model_version - base_version`` (:func:`raffm.lora_fed.start_adapters`, seeded by the download's own
names, so every replica, and the aggregator that checks the upload, computes the same adapters).
A slice reads from the store only the tensors its sub-model keeps, and of each only the leading prefix that holds the
kept block, never the whole model: so the extractor holds no global state and needs no local copy of the store, and
any number of replicas on any hosts serve the same tickets.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from raffm.checkpoints import CheckpointReader, CheckpointStore, VersionNotFoundError
from raffm.errors import AuthenticationError, NotFoundError, PermissionDeniedError, excerpt
from raffm.planning import LocalPlanner, NoFitError, Planner, PlanJob, PlanResult, adapter_and_dims
from raffm.profile import DeviceProfile
from raffm.lora import target_weight_names
from raffm.lora_fed import download_seed, start_adapters
from raffm.slicing import SlicePlan, slice_plan
from raffm.strategy import Strategy
from raffm.tickets import Ticket, TicketError, TicketSigner
from raffm.wire import WirePayload
from services.common.auth import Principal
from services.extractor.metrics import ExtractorMetrics

SliceKey = tuple[str, str, str, str, str]


@dataclass(frozen=True)
class Slice:
    key: SliceKey
    payload: WirePayload
    architecture: str
    config_json: str  # the global model's HF config: with the spec, a device builds the sub-model from it


class SliceCache:
    """LRU over built slices, bounded by entry count and by total wire bytes."""

    def __init__(self, max_entries: int = 8, max_bytes: int = 4 << 30) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[SliceKey, Slice] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: SliceKey) -> Slice | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, item: Slice) -> None:
        with self._lock:
            self._items[item.key] = item
            self._items.move_to_end(item.key)
            while len(self._items) > 1 and (
                len(self._items) > self.max_entries or sum(s.payload.nbytes for s in self._items.values()) > self.max_bytes
            ):
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class SliceService:
    def __init__(self, store: CheckpointStore, signer: TicketSigner, planner: Planner, metrics: ExtractorMetrics,
                 cache: SliceCache | None = None) -> None:
        self.store, self.signer, self.planner, self.metrics = store, signer, planner, metrics
        self.cache = cache or SliceCache()
        self._build_locks: dict[SliceKey, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    # -- Plan ---------------------------------------------------------------------------------------------------------

    def plan(self, profile: DeviceProfile, job: PlanJob, model_version: str = "", *, infer: bool = False,
             strategy: Strategy | None = None) -> PlanResult:
        """The plan of ``strategy`` (by default the service's planner's) for a device of ``profile``."""
        version = model_version or self.latest_version()
        planner = self.planner if strategy is None else LocalPlanner(self.store, strategy)
        try:
            self.store.info(version)
        except VersionNotFoundError as exc:
            raise NotFoundError(str(exc), field="model_version") from None
        try:
            result = planner.plan(profile, job, version, infer=infer)
        except NoFitError:
            self.metrics.plans.labels("no_fit").inc()
            raise
        self.metrics.plans.labels("fitted").inc()
        return result

    def latest_version(self) -> str:
        versions = self.store.versions()
        if not versions:
            raise NotFoundError("the checkpoint store holds no model version yet; start the aggregator first")
        return versions[-1].version

    # -- DownloadSlice --------------------------------------------------------------------------------------------------

    def verify(self, ticket_bytes: bytes, caller: Principal | None) -> Ticket:
        try:
            ticket = self.signer.verify(ticket_bytes)
        except TicketError as exc:
            raise AuthenticationError(str(exc), field="ticket",
                                      hint="present the ticket of your latest assignment, unmodified") from None
        if caller is not None and not caller.is_operator and caller.subject != ticket.device_id:
            raise PermissionDeniedError(f"ticket belongs to device {excerpt(ticket.device_id)}, not {excerpt(caller.subject)}",
                                        field="ticket")
        return ticket

    def slice_for(self, ticket: Ticket) -> Slice:
        recipe = ticket.training_recipe
        lora = f"lora:{ticket.base_version}:{recipe.lora_rank}:{','.join(recipe.lora_targets)}:{recipe.lora_alpha!r}"
        stored = ""
        if {recipe.frozen_dtype, recipe.base_dtype} != {"float32"}:  # which tensors travel narrower: the frozen set
            stored = (f"{recipe.frozen_dtype}:{recipe.base_dtype}:"
                      + hashlib.sha256("\n".join(sorted(recipe.frozen)).encode()).hexdigest())
        key: SliceKey = (ticket.model_version, ticket.spec_key, ticket.wire_dtype, lora if recipe.lora_rank else "",
                         stored)
        hit = self.cache.get(key)
        if hit is not None:
            self.metrics.cache_hits.inc()
            return hit
        with self._locks_lock:
            lock = self._build_locks.setdefault(key, threading.Lock())
        with lock:
            hit = self.cache.get(key)
            if hit is not None:  # built by a concurrent request while we waited
                self.metrics.cache_hits.inc()
                return hit
            self.metrics.cache_misses.inc()
            t0 = time.perf_counter()
            item = self._build(ticket, key)
            self.metrics.slice_build_seconds.observe(time.perf_counter() - t0)
            self.cache.put(item)
        with self._locks_lock:
            self._build_locks.pop(key, None)
        return item

    def _build(self, ticket: Ticket, key: SliceKey) -> Slice:
        recipe = ticket.training_recipe
        base_version = (ticket.base_version or ticket.model_version) if recipe.lora_rank else ticket.model_version
        try:
            config = self.store.info(ticket.model_version).config
            reader = self.store.reader(base_version)
        except VersionNotFoundError as exc:
            raise NotFoundError(str(exc)) from None
        adapter, dims = adapter_and_dims(config)
        plan = slice_plan(adapter, dims, ticket.elastic_spec, {n: e.shape for n, e in reader.entries.items()})
        sub = self._read(reader, plan)
        names = list(plan)
        if recipe.lora is not None:
            targets = target_weight_names(plan, recipe.lora.targets)
            base = {n: sub[n] for n in targets}
            current = base
            if base_version != ticket.model_version:
                try:
                    current = self._read(self.store.reader(ticket.model_version), {n: plan[n] for n in targets})
                except VersionNotFoundError as exc:
                    raise NotFoundError(str(exc)) from None
            seed = download_seed(ticket.model_version, base_version, ticket.spec_key, recipe.lora.rank,
                                 recipe.lora.targets, recipe.lora.alpha)
            adapters = start_adapters(current, base, recipe.lora.rank, recipe.lora.scaling, seed)
            sub.update(adapters)
            names += sorted(adapters)
        payload = WirePayload.from_state(sub, ticket.wire_dtype, names=names,
                                         dtypes=recipe.download_dtypes(names, adapter.vocab_tensors(names)))
        return Slice(key=key, payload=payload, architecture=adapter.name, config_json=json.dumps(config))

    @staticmethod
    def _read(reader: CheckpointReader, plan: SlicePlan) -> dict[str, torch.Tensor]:
        """The plan's blocks, reading of each stored tensor only the prefix that holds its block."""
        prefixes = reader.read({name: s.prefix_numel for name, s in plan.items()})
        return {name: s.take_prefix(prefixes.pop(name)) for name, s in plan.items()}
