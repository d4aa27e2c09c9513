"""Budget fitting: the largest sub-model a device can train within its memory and its round deadline.

The fitter searches a *ladder*: a list of specs, smallest first, along which every dimension (hidden width, and per
layer heads, head dimension and FFN width) is non-decreasing. Every cost of :mod:`raffm.costs` is non-decreasing in
every dimension, so costs rise along the ladder and the rungs that fit a budget form a prefix; the fitter returns the
top of that prefix. A bigger budget (more memory, more GFLOP/s, more bandwidth, a later deadline) therefore can never
yield a smaller model: monotone by construction, not by luck.

Ladder (from the top, for a BERT-like model with H heads, FFN width F, hidden width D, head dimension d):
1. heads H -> H/4 with the FFN shrunk in proportion (F * heads / H, a multiple of 8); hidden stays D;
2. hidden D -> D/4 in steps of d (the embedding matrix is about half of MiniLM, so small budgets need it);
3. heads H/4 -> 1 with the FFN in proportion; 4. hidden D/4 -> d in steps of d;
5. optionally (``shrink_depth``) layers from the top, down to one.
Head dimensions are never cut: every kept head stays whole.

Memory fits ``train_memory_mb * (1 - headroom)`` (5% by default): the prediction is within 2% of measured peak RSS,
so the measured peak stays within the declared budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from raffm.costs import Costs, CostModel, dtype_bytes
from raffm.spec import ElasticSpec, ModelDims

# (lowest allowed exclusive, highest allowed inclusive): values outside are typos, not devices
_BOUNDS: dict[str, tuple[float, float]] = {
    "train_memory_mb": (0, 16 * 2**20),  # 16 TiB
    "gflops": (0, 1e7),  # 10 PFLOP/s
    "up_mbps": (0, 1e6),  # 1 Tbit/s
    "down_mbps": (0, 1e6),
    "deadline_s": (0, 7 * 86400),  # a week
    "batch_size": (0, 65536),
    "seq_len": (0, 1 << 20),
    "local_steps": (0, 1_000_000),
    "infer_memory_mb": (0, 16 * 2**20),
}
_INTEGER_FIELDS = ("batch_size", "seq_len", "local_steps")
DEFAULT_HEADROOM = 0.05  # of the memory budget, for prediction error (measured <= 2% on MiniLM)


@dataclass(frozen=True)
class RoundBudget:
    """What a device can spend on one round: its profile's memory, compute and links (see
    :class:`raffm.profile.DeviceProfile`) plus the round's deadline and the job's batch, sequence length and steps.
    Memory in MiB, compute in sustained GFLOP/s, links in Mbit/s (10^6)."""

    train_memory_mb: float
    gflops: float
    up_mbps: float
    down_mbps: float
    deadline_s: float
    batch_size: int = 16
    seq_len: int = 64
    local_steps: int = 1  # optimizer steps per round; samples per round = local_steps * batch_size
    infer_memory_mb: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "infer_memory_mb":
                continue
            low, high = _BOUNDS[f.name]
            integer = f.name in _INTEGER_FIELDS
            ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok_type or not (low < value <= high) or value != value:
                kind = "an integer" if integer else "a number"
                raise ValueError(f"profile {f.name} is {value!r}; it must be {kind} > {low:g} and <= {high:g}")

    @property
    def samples_per_round(self) -> int:
        return self.local_steps * self.batch_size


@dataclass(frozen=True)
class RoundTime:
    """Predicted seconds of one round: download the slice, train, upload the delta."""

    download_s: float
    compute_s: float
    upload_s: float

    @property
    def total_s(self) -> float:
        return self.download_s + self.compute_s + self.upload_s


@dataclass(frozen=True)
class FitResult:
    spec: ElasticSpec
    costs: Costs
    round_time: RoundTime


def round_time(costs: Costs, profile: RoundBudget) -> RoundTime:
    """Download and upload ``costs.wire_bytes`` over the links; ``samples_per_round`` training samples of compute."""
    bits = 8.0 * costs.wire_bytes
    return RoundTime(
        download_s=bits / (profile.down_mbps * 1e6),
        compute_s=profile.samples_per_round * costs.flops_per_sample / (profile.gflops * 1e9),
        upload_s=bits / (profile.up_mbps * 1e6),
    )


def _round8(x: float) -> int:
    return max(8, int(math.ceil(x / 8)) * 8)


def ladder(dims: ModelDims, *, shrink_depth: bool = False) -> list[ElasticSpec]:
    """Specs from smallest to largest, every dimension non-decreasing along the list (see the module docstring)."""

    def ffn_for(heads: int) -> int:
        return min(dims.ffn, _round8(dims.ffn * heads / dims.heads))

    def rung(heads: int, hidden: int) -> ElasticSpec:
        return ElasticSpec.uniform(dims, heads=heads, ffn=ffn_for(heads), hidden=hidden)

    step = dims.head_dim if dims.head_dim < dims.hidden else max(1, dims.hidden // 4)
    head_floor = max(1, dims.heads // 4)
    hidden_floor = max(step, (dims.hidden // 4) // step * step)
    top_down: list[ElasticSpec] = []
    for heads in range(dims.heads, head_floor - 1, -1):  # 1. heads and FFN, full hidden
        top_down.append(rung(heads, dims.hidden))
    hidden = dims.hidden
    while hidden - step >= hidden_floor:  # 2. hidden, down to a quarter
        hidden -= step
        top_down.append(rung(head_floor, hidden))
    for heads in range(head_floor - 1, 0, -1):  # 3. the last heads
        top_down.append(rung(heads, hidden))
    while hidden - step >= step:  # 4. hidden down to one head's width
        hidden -= step
        top_down.append(rung(1, hidden))
    if shrink_depth:  # 5. depth
        smallest = top_down[-1]
        for depth in range(dims.layers - 1, 0, -1):
            top_down.append(ElasticSpec(hidden=smallest.hidden, layers=smallest.layers[:depth]))
    rungs = list(reversed(top_down))
    assert all(_dominates(b, a) for a, b in zip(rungs, rungs[1:])), "ladder must be non-decreasing"
    return rungs


def _dominates(big: ElasticSpec, small: ElasticSpec) -> bool:
    """True if every dimension of ``big`` is >= that of ``small`` (and it has at least as many layers)."""
    return (
        big.hidden >= small.hidden
        and big.depth >= small.depth
        and all(
            b.heads >= s.heads and b.head_dim >= s.head_dim and b.ffn >= s.ffn
            for b, s in zip(big.layers, small.layers)
        )
    )


def fit(
    cost_model: CostModel,
    profile: RoundBudget,
    *,
    wire_dtype: str = "float32",
    headroom: float = DEFAULT_HEADROOM,
    rungs: list[ElasticSpec] | None = None,
) -> FitResult:
    """The highest rung whose predicted training memory (plus ``headroom``) and round time fit ``profile``.

    ``headroom``: the fraction of ``train_memory_mb`` kept free for prediction error (measured within 2%), so that
    the *measured* peak stays within the declared budget. ``ValueError`` when even the smallest rung does not fit,
    saying what it needs.
    """
    dtype_bytes(wire_dtype)  # validate before any work
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom is {headroom!r}; it must be between 0 (inclusive) and 1")
    usable_mb = profile.train_memory_mb * (1 - headroom)
    rungs = rungs if rungs is not None else ladder(cost_model.dims)
    best: FitResult | None = None
    for spec in rungs:  # costs rise along the ladder: stop at the first that does not fit
        costs = cost_model.estimate(spec, batch_size=profile.batch_size, seq_len=profile.seq_len, wire_dtype=wire_dtype)
        time = round_time(costs, profile)
        if costs.train_memory_mb > usable_mb or time.total_s > profile.deadline_s:
            break
        best = FitResult(spec, costs, time)
    if best is not None:
        return best
    smallest = cost_model.estimate(
        rungs[0], batch_size=profile.batch_size, seq_len=profile.seq_len, wire_dtype=wire_dtype
    )
    need_time = round_time(smallest, profile)
    if smallest.train_memory_mb > usable_mb:
        raise ValueError(
            f"train_memory_mb {profile.train_memory_mb:g} is too small: training needs at least "
            f"{math.ceil(smallest.train_memory_mb / (1 - headroom))} MB for the smallest sub-model ({rungs[0].key()}, "
            f"{smallest.params} parameters) at batch size {profile.batch_size} and sequence length "
            f"{smallest.seq_len}; raise --memory-mb or lower --batch-size/--seq-len"
        )
    raise ValueError(
        f"deadline_s {profile.deadline_s:g} is too short: the smallest sub-model ({rungs[0].key()}) needs "
        f"{need_time.total_s:.1f} s per round (download {need_time.download_s:.1f} s, compute "
        f"{need_time.compute_s:.1f} s, upload {need_time.upload_s:.1f} s); extend the deadline, lower "
        f"--local-steps or use a smaller wire dtype"
    )


def fit_inference(
    cost_model: CostModel,
    infer_memory_mb: float,
    *,
    batch_size: int = 1,
    seq_len: int | None = 128,
    headroom: float = DEFAULT_HEADROOM,
    rungs: list[ElasticSpec] | None = None,
) -> FitResult:
    """The highest rung whose no-grad forward (plus ``headroom``) fits ``infer_memory_mb``, a budget separate from
    training's. The inference estimate is a conservative bound, not calibrated like the training one."""
    low, high = _BOUNDS["infer_memory_mb"]
    if isinstance(infer_memory_mb, bool) or not isinstance(infer_memory_mb, (int, float)) or not (
        low < infer_memory_mb <= high
    ):
        raise ValueError(f"infer_memory_mb is {infer_memory_mb!r}; it must be a number > 0 and <= {high:g}")
    if cost_model.image_tokens is not None:
        seq_len = None
    elif seq_len is not None:
        seq_len = min(seq_len, cost_model.max_positions)
    rungs = rungs if rungs is not None else ladder(cost_model.dims)
    best: FitResult | None = None
    for spec in rungs:
        costs = cost_model.estimate(spec, batch_size=batch_size, seq_len=seq_len)
        if costs.infer_memory_mb > infer_memory_mb * (1 - headroom):
            break
        best = FitResult(spec, costs, RoundTime(0.0, 0.0, 0.0))
    if best is None:
        need = cost_model.estimate(rungs[0], batch_size=batch_size, seq_len=seq_len).infer_memory_mb
        raise ValueError(
            f"infer_memory_mb {infer_memory_mb:g} is too small: inference needs at least {math.ceil(need / (1 - headroom))} MB for "
            f"the smallest sub-model ({rungs[0].key()}) at batch size {batch_size}; raise the inference memory budget"
        )
    return best
