"""Sliced FedAvg over sub-model deltas, folded one update at a time.

A client trains the sub-model its :class:`~raffm.slicing.SlicePlan` describes and uploads the *delta* of every
sub-model tensor (trained minus received, shaped ``plan[name].sub_shape``) together with its sample count. The server
folds each accepted delta into running sums of the global shape as it arrives and builds the new global state once
the round closes.

``coverage`` mode (the default): for every element, the sample-weighted mean of the deltas of the clients whose slice
covers it; elements no client covered keep their global value bit for bit; ``new = old + server_lr * mean``.

``paper`` mode (the official research code's rule, kept for comparison only): every delta is zero-filled to the
global shape, the deltas are summed unweighted and divided by the number of participants:
``new = old + server_lr * sum / participants``. Small slices are thus shrunk towards zero.

Memory is O(model): one running sum per floating-point global tensor, plus, per tensor, the total weight of every
*distinct* slice folded into it (slices are leading blocks, so a per-element coverage count is rebuilt from these
few boxes when the round closes instead of being updated on every fold). A fold is one multi-tensor in-place
``add_`` into cached strided views of the running sums' kept blocks (no index tensors, no full-size temporaries; big
deltas of another dtype convert in chunks), after a validation pass over the whole update (one sum per tensor for
finiteness): a rejected update never touches the sums.

Accumulation is float64 by default. With integer sample counts whose round total stays below 2**29, every product
``weight * delta`` and every partial sum of identical deltas is exact in float64, so a single covering client gives
exactly its delta, identical deltas give exactly that delta, and the fold order changes the result only through
rare double roundings. ``accum_dtype=torch.float32`` halves the sums' memory and folds about 1.8x as fast (see
``bench/bench_core.py``) at the price of errors of about one float32 ulp in the mean.

The running state is checkpointable (:meth:`SlicedFedAvg.state_dict`, :meth:`SlicedFedAvg.load_state_dict`), and
folding is deterministic: re-folding the same accepted updates in the same order rebuilds bit-identical sums.
An aggregator is not thread-safe; the caller serialises folds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import Any, Literal

import torch

from raffm.slicing import SlicePlan, TensorSlice

Mode = Literal["coverage", "paper"]
MODES: tuple[Mode, ...] = ("coverage", "paper")
ACCUM_DTYPES = (torch.float32, torch.float64)
REJECTION_REASONS = ("unknown_tensor", "missing_tensor", "shape", "dtype", "device", "non_finite", "weight")
_STATE_FORMAT = 1


class UpdateRejected(ValueError):
    """A client update that must not be folded. ``reason`` is one of :data:`REJECTION_REASONS` (a metrics label)."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REJECTION_REASONS, reason
        super().__init__(message)
        self.reason = reason


def _names(names: Iterable[str], limit: int = 5) -> str:
    ordered = sorted(names)
    shown = ", ".join(repr(n) for n in ordered[:limit])
    return shown + (f" and {len(ordered) - limit} more" if len(ordered) > limit else "")


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True iff every element of every tensor is finite: one read-only reduction pass per tensor, no full-size
    temporary, one host sync for the lot.

    The sum is NaN or infinite if any element is (NaN propagates, an infinity stays one or meets its opposite and
    makes NaN). A sum in the tensor's own dtype can also overflow for finite values (float32: a total above about
    3e38); only then is every tensor checked element by element, so a false alarm costs time, never a wrong answer.
    A plain sum is the cheapest reduction that does this (the L2 norm used before took about a quarter longer).
    """
    nonempty = [t for t in tensors if t.numel()]
    if not nonempty:
        return True
    if bool(torch.isfinite(torch.stack([t.sum().double() for t in nonempty])).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in nonempty)


# Elements converted per step when the delta's dtype differs from the sums': 512 KiB of float64, inside a core's L2
# (2^16 folded 1.2x as fast as 2^18 on a Xeon with 2 MiB of L2 per core, bench/results/2026-12-02.md).
_CHUNK = 1 << 16
_SMALL = 1 << 14  # deltas up to this many elements are added by the multi-tensor add_ even when the dtypes differ


def _add_converted(block: torch.Tensor, src: torch.Tensor, alpha: float, scratch: torch.Tensor) -> None:
    """``block += alpha * src`` for a ``src`` of another dtype, converting through a small reusable buffer.

    A mixed-dtype ``add_`` on CPU first casts the whole operand into a new full-size tensor; converting chunk by
    chunk keeps the fold free of large temporaries (about 4x faster for BERT-base tensors).
    ``block``: a strided view of the sums, ``src``: the delta reshaped to ``block.shape``.
    """
    if src.numel() <= scratch.numel():
        buffer = scratch[: src.numel()].view(src.shape)
        buffer.copy_(src)
        block.add_(buffer, alpha=alpha)
        return
    row = src[0].numel()
    if row > scratch.numel():  # one leading index is already too big: split further down
        for i in range(src.shape[0]):
            _add_converted(block[i], src[i], alpha, scratch)
        return
    step = scratch.numel() // row
    for i in range(0, src.shape[0], step):
        _add_converted(block[i : i + step], src[i : i + step], alpha, scratch)


class SlicedFedAvg:
    """Streaming sliced FedAvg for one round.

    ``global_state``: the model the clients' slices were cut from (name -> tensor of the global shape); it is never
    modified, and must not be modified by the caller while the round is open (it is read again by :meth:`result`).
    Integer and bool tensors are never averaged: they are copied unchanged and a delta for them is rejected.
    """

    mode: Mode
    server_lr: float
    accum_dtype: torch.dtype
    _global: dict[str, torch.Tensor]
    _sums: dict[str, torch.Tensor]
    _cover: dict[str, dict[TensorSlice, float]]
    _participants: int
    _total_weight: float
    _scratch: torch.Tensor | None
    _blocks: dict[tuple[str, TensorSlice], torch.Tensor]

    def __init__(
        self,
        global_state: Mapping[str, torch.Tensor],
        *,
        mode: Mode = "coverage",
        server_lr: float = 1.0,
        accum_dtype: torch.dtype = torch.float64,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode is {mode!r}; it must be one of {', '.join(MODES)}")
        if isinstance(server_lr, bool) or not isinstance(server_lr, Real) or not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr is {server_lr!r}; it must be a finite number > 0")
        if accum_dtype not in ACCUM_DTYPES:
            raise ValueError(f"accum_dtype is {accum_dtype}; it must be torch.float32 or torch.float64")
        self.mode = mode
        self.server_lr = float(server_lr)
        self.accum_dtype = accum_dtype
        self._global = {name: t.detach() for name, t in global_state.items()}
        # Running sums, global shape: sum_i w_i * delta_i (coverage) or sum_i delta_i (paper), zero where uncovered.
        self._sums = {
            name: torch.zeros(t.shape, dtype=accum_dtype, device=t.device)
            for name, t in self._global.items()
            if t.is_floating_point()
        }
        # Per tensor, the total weight (coverage) or client count (paper) folded through each distinct slice.
        self._cover = {name: {} for name in self._sums}
        self._participants = 0
        self._total_weight = 0.0
        self._scratch = None  # conversion buffer for deltas whose dtype differs from the sums'
        self._blocks = {}  # (name, slice) -> the kept block of the running sum, a view built once per distinct slice

    @property
    def participants(self) -> int:
        """Number of updates folded so far."""
        return self._participants

    @property
    def total_weight(self) -> float:
        """Sum of the weights (sample counts) of the updates folded so far."""
        return self._total_weight

    # -- validation -------------------------------------------------------------------------------------------------

    def _check_plan(self, plan: SlicePlan) -> None:
        """A plan that does not fit the global state is a server-side bug, not a bad update: plain ``ValueError``."""
        for name, s in plan.items():
            tensor = self._global.get(name)
            if tensor is None:
                raise ValueError(f"slice plan names tensor {name!r}, which the global state does not have")
            if tuple(tensor.shape) != s.shape:
                raise ValueError(
                    f"slice plan expects global tensor {name!r} of shape {s.shape}; it has shape {tuple(tensor.shape)}"
                )

    @torch.no_grad()
    def validate(
        self,
        delta: Mapping[str, torch.Tensor],
        plan: SlicePlan,
        weight: float,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Raise :class:`UpdateRejected` unless ``delta`` is a foldable update for ``plan``.

        ``delta[name]``: a dense tensor of shape ``plan[name].sub_shape`` and dtype ``dtype`` (the job's wire dtype),
        for exactly the plan's floating-point tensors; every value finite. ``weight``: the sample count, finite > 0.
        Cheap checks run first; the finiteness pass reads every byte once.
        """
        self._check_plan(plan)
        if isinstance(weight, bool) or not isinstance(weight, Real) or not (math.isfinite(weight) and weight > 0):
            raise UpdateRejected("weight", f"update weight (sample count) is {weight!r}; it must be a finite number > 0")
        expected = {name for name in plan if name in self._sums}
        unexpected = set(delta) - expected
        if unexpected:
            integer = {n for n in unexpected if n in plan}
            detail = f" ({_names(integer)} not floating-point in the global state, never aggregated)" if integer else ""
            raise UpdateRejected(
                "unknown_tensor", f"update has {len(unexpected)} tensor(s) not in its slice plan: {_names(unexpected)}{detail}"
            )
        missing = expected - set(delta)
        if missing:
            raise UpdateRejected("missing_tensor", f"update lacks {len(missing)} tensor(s) of its slice plan: {_names(missing)}")
        for name, tensor in delta.items():
            if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
                what = type(tensor).__name__ if not isinstance(tensor, torch.Tensor) else f"a {tensor.layout} tensor"
                raise UpdateRejected("dtype", f"update tensor {name!r} is {what}; expected a dense {dtype} tensor")
            if tensor.dtype != dtype:
                raise UpdateRejected("dtype", f"update tensor {name!r} has dtype {tensor.dtype}; expected {dtype}")
            if tuple(tensor.shape) != plan[name].sub_shape:
                raise UpdateRejected(
                    "shape", f"update tensor {name!r} has shape {tuple(tensor.shape)}; expected {plan[name].sub_shape}"
                )
            if tensor.device != self._sums[name].device:
                raise UpdateRejected(
                    "device", f"update tensor {name!r} is on {tensor.device}; expected {self._sums[name].device}"
                )
        if _all_finite(delta.values()):
            return
        for name, tensor in delta.items():  # rejected: find the first offending tensor for the message
            if not _all_finite([tensor]):
                bad = ~torch.isfinite(tensor)
                first = tuple(int(i) for i in bad.nonzero()[0])
                raise UpdateRejected(
                    "non_finite",
                    f"update tensor {name!r} has {int(bad.sum())} non-finite value(s), the first at index {first}: "
                    f"{tensor[first].item()}",
                )

    # -- folding ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def fold(
        self,
        delta: Mapping[str, torch.Tensor],
        plan: SlicePlan,
        weight: float,
        *,
        dtype: torch.dtype = torch.float32,
        validated: bool = False,
    ) -> None:
        """Validate the update fully, then add it into the running sums (the update itself is not modified).

        Raises :class:`UpdateRejected` (sums untouched) for a bad update. Cost: one read pass for validation and
        one strided ``sums_block += weight * delta`` per tensor. ``validated``: the caller has already run
        :meth:`validate` on these very arguments (the aggregator does, before it takes its lock), so the read pass
        is skipped and the fold is the adds alone.
        """
        if not validated:
            self.validate(delta, plan, weight, dtype=dtype)
        alpha = float(weight) if self.mode == "coverage" else 1.0
        blocks: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        for name, tensor in delta.items():
            s = plan[name]
            block = self._block(name, s)
            src = tensor.reshape(s.keep)  # a view for a contiguous delta
            if src.dtype == self.accum_dtype or src.numel() <= _SMALL:
                blocks.append(block)  # a small converting add_ casts through a small temporary: cheap
                srcs.append(src)
            else:
                if self._scratch is None:
                    self._scratch = torch.empty(_CHUNK, dtype=self.accum_dtype, device=block.device)
                _add_converted(block, src, alpha, self._scratch)
            cover = self._cover[name]
            cover[s] = cover.get(s, 0.0) + alpha
        if blocks:  # one multi-tensor call instead of one Python-level add_ per tensor
            torch._foreach_add_(blocks, srcs, alpha=alpha)
        self._participants += 1
        self._total_weight += float(weight)

    def _block(self, name: str, s: TensorSlice) -> torch.Tensor:
        """The kept block of ``name``'s running sum for slice ``s`` (a cached strided view of ``self._sums``)."""
        key = (name, s)
        block = self._blocks.get(key)
        if block is None:
            block = self._blocks[key] = s.block(self._sums[name])
        return block

    # -- closing ----------------------------------------------------------------------------------------------------

    def _mask(self, name: str) -> torch.Tensor:
        """Bool tensor of the global shape: True where at least one folded slice covers tensor ``name``."""
        mask = torch.zeros(self._sums[name].shape, dtype=torch.bool, device=self._sums[name].device)
        for s in self._cover[name]:
            s.block(mask).fill_(True)
        return mask

    @torch.no_grad()
    def _mean_delta(self, name: str) -> torch.Tensor:
        """The per-element mean delta of tensor ``name`` (global shape, accum dtype; NaN or 0 where uncovered)."""
        sums = self._sums[name]
        if self.mode == "paper":
            return sums / self._participants
        weight = torch.zeros_like(sums)
        for s, w in self._cover[name].items():  # one fill per distinct slice, not per client
            s.block(weight).add_(w)
        return torch.div(sums, weight, out=weight)  # 0/0 = NaN where uncovered; masked out by the caller

    @torch.no_grad()
    def result(self) -> dict[str, torch.Tensor]:
        """The new global state: fresh tensors with the global dtypes and shapes. The aggregator stays usable.

        ``new = old + server_lr * mean`` where covered (the mean rounded once to the global dtype, so a mean that
        is exactly a client's delta adds exactly that delta); ``old`` bit for bit elsewhere.
        """
        out: dict[str, torch.Tensor] = {}
        for name, old in self._global.items():
            if name not in self._sums or not self._cover[name]:
                out[name] = old.clone()
                continue
            step = self._mean_delta(name).to(old.dtype)  # a new tensor unless the dtypes already agree
            if self.server_lr != 1.0:
                step.mul_(self.server_lr)
            step.add_(old)
            out[name] = torch.where(self._mask(name), step, old, out=step)  # uncovered elements stay bit-identical
        return out

    # -- checkpointing ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The running state (copies): sums, per-slice weights, counters. ``torch.save``-able; the global state
        itself is not included (it is the round's model version, stored elsewhere)."""
        return {
            "format": _STATE_FORMAT,
            "mode": self.mode,
            "server_lr": self.server_lr,
            "accum_dtype": str(self.accum_dtype).removeprefix("torch."),
            "participants": self._participants,
            "total_weight": self._total_weight,
            "sums": {name: t.clone() for name, t in self._sums.items()},
            "cover": {
                name: [[list(s.shape), list(s.view), list(s.keep), list(s.sub_shape), w] for s, w in cover.items()]
                for name, cover in self._cover.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` taken from an aggregator with the same global shapes, mode and settings."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"aggregator state format is {state.get('format')!r}; expected {_STATE_FORMAT}")
        mine = {"mode": self.mode, "server_lr": self.server_lr, "accum_dtype": str(self.accum_dtype).removeprefix("torch.")}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(f"aggregator state has {key}={state[key]!r}; this aggregator has {key}={value!r}")
        sums: Mapping[str, torch.Tensor] = state["sums"]
        if set(sums) != set(self._sums):
            raise ValueError(
                f"aggregator state tensors differ from the global state's: "
                f"extra {_names(set(sums) - set(self._sums))}, missing {_names(set(self._sums) - set(sums))}"
            )
        for name, tensor in sums.items():
            if tuple(tensor.shape) != tuple(self._sums[name].shape) or tensor.dtype != self.accum_dtype:
                raise ValueError(
                    f"aggregator state tensor {name!r} is {tensor.dtype}{tuple(tensor.shape)}; "
                    f"expected {self.accum_dtype}{tuple(self._sums[name].shape)}"
                )
        cover = {
            name: {TensorSlice(tuple(sh), tuple(v), tuple(k), tuple(sub)): float(w) for sh, v, k, sub, w in entries}
            for name, entries in state["cover"].items()
        }
        self._sums = {name: t.clone().to(self._sums[name].device) for name, t in sums.items()}
        self._blocks = {}  # the cached views point into the replaced sums
        self._cover = {name: cover.get(name, {}) for name in self._sums}
        self._participants = int(state["participants"])
        self._total_weight = float(state["total_weight"])


def sliced_fedavg(
    global_state: Mapping[str, torch.Tensor],
    updates: Iterable[tuple[Mapping[str, torch.Tensor], SlicePlan, float]],
    *,
    mode: Mode = "coverage",
    server_lr: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """One-shot convenience: fold every ``(delta, plan, weight)`` and return the new global state.

    Raises :class:`UpdateRejected` at the first bad update (nothing is returned).
    """
    agg = SlicedFedAvg(global_state, mode=mode, server_lr=server_lr)
    for delta, plan, weight in updates:
        agg.fold(delta, plan, weight, dtype=dtype)
    return agg.result()
