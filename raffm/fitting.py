"""Budget fitting: the largest sub-model a device can train within its memory and its round deadline.

The fitter searches a *ladder*: a list of specs, smallest first, along which every dimension (and, per layer, heads,
head dimension and FFN width) is non-decreasing. Every cost of :mod:`raffm.costs` is non-decreasing in every
dimension, so costs rise along the ladder and the rungs that fit a budget form a prefix; the fitter returns the top of
that prefix. A bigger budget (more memory, more GFLOP/s, more bandwidth, a later deadline) therefore can never yield
a smaller model: monotone by construction, not by luck.

Ladder (from the top, for a model with H heads and FFN width F): heads H -> 1 with the FFN shrunk in proportion
(F * heads / H, a multiple of 8), then optionally (``shrink_depth``) layers from the top, down to one. The hidden
(residual) width and the head dimension are never cut: a sub-model with a narrower residual stream computes a
different function from the model's (measured on MiniLM: cosine 0.17 of the last hidden state at 3/4 hidden width,
against 0.64 with heads and FFN cut to a quarter), so its training does not transfer to the global model.

The costs of a rung are priced with the recipes the strategy offers for it (``recipes_for``, in order of
preference): frozen tensors, nested cuts and activation checkpointing change memory, compute and upload bytes.

Memory fits ``train_memory_mb * (1 - headroom) - HEADROOM_MB`` (:func:`usable_memory_mb`): the prediction is within
2% of the measured peak RSS on the development machine, but CI's host measured up to 15 MB more for checkpointed
recipes (a fixed, per-host runtime cost), so the margin has a fixed part as well as a relative one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from raffm.costs import Costs, CostModel, dtype_bytes
from raffm.recipe import Recipe
from raffm.slicing import nested
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
HEADROOM_MB = 16.0  # and a fixed part, for runtime costs that differ between hosts (measured up to 15 MB)


def usable_memory_mb(train_memory_mb: float, headroom: float = DEFAULT_HEADROOM) -> float:
    """The predicted training memory a budget of ``train_memory_mb`` admits: the rest is the fitter's margin."""
    return train_memory_mb * (1 - headroom) - HEADROOM_MB


def memory_budget_mb(need_mb: float, headroom: float = DEFAULT_HEADROOM) -> float:
    """The smallest budget that admits a predicted need of ``need_mb`` (the inverse of :func:`usable_memory_mb`)."""
    return (need_mb + HEADROOM_MB) / (1 - headroom)


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
    # The device holds the recipe's frozen tensors from an earlier round: their download is not priced again.
    holds_frozen: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if (value is None and f.name == "infer_memory_mb") or f.name == "holds_frozen":
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
    recipe: Recipe = Recipe()


RecipesFor = Callable[[ElasticSpec], Sequence[Recipe]]


def round_time(costs: Costs, profile: RoundBudget) -> RoundTime:
    """The slice down (less the frozen tensors the device holds), ``samples_per_round`` training samples of compute,
    the delta of the trained tensors up."""
    down = costs.wire_bytes - (costs.cached_bytes if profile.holds_frozen else 0)
    return RoundTime(
        download_s=8.0 * down / (profile.down_mbps * 1e6),
        compute_s=profile.samples_per_round * costs.flops_per_sample / (profile.gflops * 1e9),
        upload_s=8.0 * costs.upload_bytes / (profile.up_mbps * 1e6),
    )


def _round8(x: float) -> int:
    return max(8, int(math.ceil(x / 8)) * 8)


def width_spec(dims: ModelDims, heads: int, *, depth: int | None = None) -> ElasticSpec:
    """``heads`` attention heads in every layer and the FFN shrunk in proportion; full hidden width."""
    ffn = min(dims.ffn, _round8(dims.ffn * heads / dims.heads))
    return ElasticSpec.uniform(dims, heads=heads, ffn=ffn, depth=depth)


def ladder(dims: ModelDims, *, shrink_depth: bool = False) -> list[ElasticSpec]:
    """Specs from smallest to largest, every dimension non-decreasing along the list (see the module docstring)."""
    top_down = [width_spec(dims, heads) for heads in range(dims.heads, 0, -1)]
    if shrink_depth:
        top_down += [width_spec(dims, 1, depth=depth) for depth in range(dims.layers - 1, 0, -1)]
    rungs = list(reversed(top_down))
    assert all(nested(a, b) for a, b in zip(rungs, rungs[1:])), "ladder must be non-decreasing"
    return rungs


def fit(
    cost_model: CostModel,
    profile: RoundBudget,
    *,
    wire_dtype: str = "float32",
    headroom: float = DEFAULT_HEADROOM,
    rungs: list[ElasticSpec] | None = None,
    recipes_for: RecipesFor = lambda spec: (Recipe(),),
) -> FitResult:
    """The highest rung whose predicted training memory (plus ``headroom``) and round time fit ``profile`` with one
    of the recipes ``recipes_for(rung)`` offers, in their order of preference (plain fine-tuning by default).

    Every recipe's costs rise along the ladder, so the rungs that fit with *some* recipe still form a prefix.
    ``headroom``: the fraction of ``train_memory_mb`` kept free for prediction error, on top of ``HEADROOM_MB``, so
    that the *measured* peak stays within the declared budget. ``ValueError`` when even the smallest rung does not fit,
    saying what it needs.
    """
    dtype_bytes(wire_dtype)  # validate before any work
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom is {headroom!r}; it must be between 0 (inclusive) and 1")
    usable_mb = usable_memory_mb(profile.train_memory_mb, headroom)
    rungs = rungs if rungs is not None else ladder(cost_model.dims)

    def options(spec: ElasticSpec) -> list[FitResult]:
        results = []
        for recipe in recipes_for(spec):
            costs = cost_model.estimate(spec, batch_size=profile.batch_size, seq_len=profile.seq_len,
                                        wire_dtype=wire_dtype, recipe=recipe)
            results.append(FitResult(spec, costs, round_time(costs, profile), recipe))
        return results

    def fits(result: FitResult) -> bool:
        return result.costs.train_memory_mb <= usable_mb and result.round_time.total_s <= profile.deadline_s

    best: FitResult | None = None
    for spec in rungs:  # costs rise along the ladder: stop at the first that does not fit
        choice = next((r for r in options(spec) if fits(r)), None)
        if choice is None:
            break
        best = choice
    if best is not None:
        return best
    smallest = options(rungs[0])
    leanest = min(smallest, key=lambda r: r.costs.train_memory_mb)
    if leanest.costs.train_memory_mb > usable_mb:
        how = " with activation checkpointing" if leanest.recipe.checkpointing else ""
        raise ValueError(
            f"train_memory_mb {profile.train_memory_mb:g} is too small: training needs at least "
            f"{math.ceil(memory_budget_mb(leanest.costs.train_memory_mb, headroom))} MB for the smallest sub-model "
            f"({rungs[0].key()}, {leanest.costs.params} parameters) at batch size {profile.batch_size} and sequence "
            f"length {leanest.costs.seq_len}{how}: a predicted peak of {leanest.costs.train_memory_mb:.0f} MB plus "
            f"the fitter's margin ({headroom:.0%} and {HEADROOM_MB:g} MB); raise --memory-mb or lower "
            "--batch-size/--seq-len"
        )
    need = min((r for r in smallest if r.costs.train_memory_mb <= usable_mb), key=lambda r: r.round_time.total_s)
    t = need.round_time
    raise ValueError(
        f"deadline_s {profile.deadline_s:g} is too short: the smallest sub-model ({rungs[0].key()}) needs "
        f"{t.total_s:.1f} s per round (download {t.download_s:.1f} s, compute {t.compute_s:.1f} s, upload "
        f"{t.upload_s:.1f} s); extend the deadline, lower --local-steps or use a smaller wire dtype"
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
