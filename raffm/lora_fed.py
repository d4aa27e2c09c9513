"""Federated LoRA with heterogeneous ranks and heterogeneous slices: what the server keeps, sends and averages.

The rule (FlexLoRA-style redistribution, sliced-FedAvg aggregation of *products*)
-------------------------------------------------------------------------------
The server keeps, per target weight ``W0 [out, in]`` of the global model, a dense **global update** ``U`` of the same
shape (zero at the start of a model version). The effective global weight is ``W0 + U``; ``W0`` never changes
during LoRA training, so a device downloads its base slice once and never again (base weights are never re-sent).

1. *Down.* Device ``i`` with slice plan ``P_i`` and rank ``r_i`` receives, per target, the rank-``r_i`` truncated SVD
   of its block of ``U``: ``U_i = P_i(U) ~= s_i B_i A_i`` with ``B_i = u sqrt(S/s_i)``, ``A_i = sqrt(S/s_i) v^T``
   (:func:`redistribute`). Where ``U_i`` has rank < ``r_i`` (round one: ``U = 0``), the spare rows of ``A_i`` are
   fresh random directions and the matching columns of ``B_i`` are zero, so ``s B_i A_i`` is still the truncation
   and LoRA's zero-``B`` start is kept (with both factors zero no gradient would ever flow).
2. *Train.* The device trains ``A``, ``B`` only; its effective weight is ``W0_i + s B A``.
3. *Up.* The device uploads its trained factors ``B_i'``, ``A_i'``. The server forms the device's update of the
   **effective weight**, ``D_i = s_i (B_i' A_i' - B_i A_i)`` (dense, the slice's shape; :func:`lora_update`), and
   folds it with :class:`~raffm.aggregation.SlicedFedAvg` over ``U``: per element, the sample-weighted mean of the
   ``D_i`` of the devices whose slice covers it; uncovered elements keep their value; ``U += server_lr * mean``.

Why this is sound. Averaging ``A`` and ``B`` separately is wrong twice over: ``mean(B) mean(A) != mean(B A)`` (the
cross terms ``B_i A_j`` are updates no device made), and factors of different ranks cannot even be added. Moreover a
factorisation is defined only up to ``B G, G^-1 A``, so any rule acting on the factors depends on an arbitrary gauge.
The product ``s B A`` is what the device actually changed in its model, it is gauge-free and rank-free, and it has
the base weight's shape, so the rule above is *exactly* the coverage-weighted sliced FedAvg this project uses for
full fine-tuning, applied to the effective weights ``W0 + U``: with equal slices and ranks it is the plain mean of
the products (no approximation), and a device's update lands only inside its slice. Subtracting the starting
product ``s B_i A_i`` matters: the truncation residual ``U_i - s B_i A_i`` (what a small rank could not carry down)
is then *not* mistaken for something the device un-learned, so a low-rank device never erases the global update
beyond its rank; the residual only costs that device a slightly different starting point (the tail singular values
of its block, :func:`truncation_error`). Stacking factors (FLoRA) is also exact for a plain sum, but a
coverage-weighted mean divides different blocks by different weights, which no stack of factors expresses, and each
device's download must be cut to its rank anyway; so the server keeps ``U`` dense (memory O(target weights), the same
as sliced FedAvg's sums) and cuts it per device by SVD, the best rank-``r`` approximation in Frobenius and spectral
norm (Eckart-Young).

What crosses the wire each round (:func:`round_bytes`): down, ``A_i`` and ``B_i`` for every target in the slice
(``r_i (out_i + in_i)`` numbers each); up, the same shapes. Nothing else: the base slice is cached on the device
for the model version. For inference, :func:`merge_update` folds ``U`` into the base (``W0 + U``), from which any
sub-model is extracted as usual; on a device, :func:`raffm.lora.merge_lora` folds its own adapters.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

import torch

from raffm.aggregation import Mode, SlicedFedAvg, UpdateRejected
from raffm.lora import A_SUFFIX, B_SUFFIX, module_name, target_weight_names
from raffm.slicing import SlicePlan
from raffm.wire import itemsize, wire_dtype_name


def _check_scaling(scaling: float) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"LoRA scaling is {scaling!r}; it must be a finite number > 0")
    return float(scaling)


def init_global_update(base: Mapping[str, torch.Tensor], targets: Iterable[str]) -> dict[str, torch.Tensor]:
    """A zero global update ``U`` (float32, the base weight's shape) for every target weight of the global model."""
    return {name: torch.zeros(base[name].shape, dtype=torch.float32, device=base[name].device)
            for name in target_weight_names(base, targets)}


def factors(adapters: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Base weight name -> ``(B [out, r], A [r, in])`` from adapter tensors named ``<module>.lora_A/B``."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in adapters:
        if not name.endswith((A_SUFFIX, B_SUFFIX)):
            raise UpdateRejected("unknown_tensor", f"{name!r} is not a LoRA adapter tensor (it must end in {A_SUFFIX} or {B_SUFFIX})")
    for name in adapters:
        if name.endswith(A_SUFFIX):
            module = name[: -len(A_SUFFIX)]
            if module + B_SUFFIX not in adapters:
                raise UpdateRejected("missing_tensor", f"adapter {name!r} has no {module + B_SUFFIX!r}")
            out[module + ".weight"] = (adapters[module + B_SUFFIX], adapters[name])
    lone = [n for n in adapters if n.endswith(B_SUFFIX) and n[: -len(B_SUFFIX)] + ".weight" not in out]
    if lone:
        raise UpdateRejected("missing_tensor", f"adapter(s) {lone[:5]} have no lora_A")
    return out


def _product(name: str, b: torch.Tensor, a: torch.Tensor, shape: tuple[int, ...], scaling: float) -> torch.Tensor:
    """``s B A`` in float64 after checking it has the slice's ``shape``."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(shape):
        raise UpdateRejected(
            "shape", f"adapters of {name!r} have shapes B {tuple(b.shape)}, A {tuple(a.shape)}; "
            f"expected B [{shape[0]}, r] and A [r, {shape[1]}]")
    return (b.to(torch.float64) @ a.to(torch.float64)) * scaling


def lora_update(
    start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], plan: SlicePlan, scaling: float
) -> dict[str, torch.Tensor]:
    """A device's update of its effective weights, ``s (B' A' - B A)`` per target (float32, the slice's shape).

    ``start``: the adapters the device was sent; ``trained``: what it uploaded (the same names; only products are
    compared, so the ranks of the two need not even agree).
    ``plan``: the device's slice plan (only the adapted weights are read). Raises
    :class:`~raffm.aggregation.UpdateRejected` for missing, unknown or misshapen adapters.
    """
    scaling = _check_scaling(scaling)
    begin, end = factors(start), factors(trained)
    if set(begin) != set(end):
        raise UpdateRejected("unknown_tensor" if set(end) - set(begin) else "missing_tensor",
                             f"uploaded adapters adapt {sorted(set(end) ^ set(begin))[:5]} unlike the ones sent")
    out: dict[str, torch.Tensor] = {}
    for name, (b1, a1) in end.items():
        if name not in plan:
            raise UpdateRejected("unknown_tensor", f"adapter for {name!r}, which the slice plan does not have")
        shape = plan[name].sub_shape
        b0, a0 = begin[name]
        out[name] = (_product(name, b1, a1, shape, scaling) - _product(name, b0, a0, shape, scaling)).to(torch.float32)
    return out


class LoRAFedAvg:
    """One round of federated LoRA on the server: a :class:`SlicedFedAvg` over the global update ``U``.

    ``global_update``: target weight name -> ``U`` (float32, global shape; never modified). Fold each device's
    ``(start, trained)`` adapters with its slice plan, sample count and LoRA scaling; :meth:`result` is the new ``U``.
    """

    def __init__(self, global_update: Mapping[str, torch.Tensor], *, mode: Mode = "coverage",
                 server_lr: float = 1.0, accum_dtype: torch.dtype = torch.float64) -> None:
        for name, u in global_update.items():
            if u.dtype != torch.float32 or u.dim() != 2:
                raise ValueError(f"global update {name!r} is {u.dtype}{tuple(u.shape)}; expected a 2-D float32 tensor")
        self._avg = SlicedFedAvg(global_update, mode=mode, server_lr=server_lr, accum_dtype=accum_dtype)
        self._names = frozenset(global_update)

    @property
    def participants(self) -> int:
        return self._avg.participants

    def fold(self, start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], plan: SlicePlan,
             weight: float, *, scaling: float) -> None:
        """Validate and fold one device's update (:class:`UpdateRejected`, sums untouched, if it is bad). Every
        target weight the plan covers must be adapted."""
        delta = lora_update(start, trained, plan, scaling)
        unknown = set(delta) - self._names
        if unknown:
            raise UpdateRejected("unknown_tensor", f"adapters for {sorted(unknown)[:5]}, which are not LoRA targets")
        self._avg.fold(delta, {n: s for n, s in plan.items() if n in self._names}, weight, dtype=torch.float32)

    def result(self) -> dict[str, torch.Tensor]:
        return self._avg.result()


def _spare_rows(rank: int, cols: int, generator: torch.Generator | None) -> torch.Tensor:
    bound = 1.0 / math.sqrt(cols)  # the same init as a fresh adapter's A (raffm.lora)
    return torch.empty(rank, cols, dtype=torch.float64).uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def redistribute(
    global_update: Mapping[str, torch.Tensor], plan: SlicePlan, rank: int, scaling: float,
    *, generator: torch.Generator | None = None, rtol: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """The adapters device ``i`` starts its round from: per target, the rank-``rank`` truncated SVD of its block of
    ``U``, split evenly between the factors, ``s B A = u_r S_r v_r^T`` (float32 ``<module>.lora_A [r, in]`` and
    ``.lora_B [out, r]``). Singular values <= ``rtol * S_max`` count as zero: their directions are replaced by fresh
    random ``A`` rows with zero ``B`` columns (so the product is unchanged and training can start there).
    """
    blocks = {name: plan[name].take(u) for name, u in global_update.items() if name in plan}  # else a dropped layer
    return redistribute_blocks(blocks, rank, scaling, generator=generator, rtol=rtol)


@torch.no_grad()
def redistribute_blocks(
    blocks: Mapping[str, torch.Tensor], rank: int, scaling: float,
    *, generator: torch.Generator | None = None, rtol: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """:func:`redistribute` of a device's blocks of ``U`` (target weight name -> block ``[out_i, in_i]``), taken in
    name order (so a seeded ``generator`` draws the same spare rows whatever order the blocks came in)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank is {rank!r}; it must be an integer >= 1")
    scaling = _check_scaling(scaling)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(blocks):
        block = blocks[name].to(torch.float64)
        rows, cols = block.shape
        left, sv, right_t = torch.linalg.svd(block, full_matrices=False)
        kept = min(rank, sv.numel())
        if sv.numel():
            kept = min(kept, int((sv > rtol * sv[0]).sum()) if sv[0] > 0 else 0)
        root = (sv[:kept] / scaling).sqrt()
        b = torch.zeros(rows, rank, dtype=torch.float64)
        a = torch.empty(rank, cols, dtype=torch.float64)
        b[:, :kept] = left[:, :kept] * root
        a[:kept] = root[:, None] * right_t[:kept]
        a[kept:] = _spare_rows(rank - kept, cols, generator)
        out[module_name(name) + A_SUFFIX] = a.to(torch.float32)
        out[module_name(name) + B_SUFFIX] = b.to(torch.float32)
    return out


def adapter_seed(*parts: str) -> int:
    """A generator seed from strings that name a download (model version, base version, spec key, rank, ...): every
    server that computes the same download's starting adapters draws the same spare rows."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def download_seed(model_version: str, base_version: str, spec_key: str, rank: int, targets: Iterable[str],
                  alpha: float) -> int:
    """The seed of one LoRA download's spare rows (:func:`adapter_seed` of everything that names the download)."""
    return adapter_seed(model_version, base_version, spec_key, str(rank), ",".join(targets), repr(float(alpha)))


@torch.no_grad()
def start_adapters(
    current: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], rank: int, scaling: float, seed: int,
) -> dict[str, torch.Tensor]:
    """The adapters a device starts a round from when the server keeps merged versions: :func:`redistribute_blocks`
    of ``current - base`` per target block (both ``name -> [out_i, in_i]``, the device's blocks of the current version
    and of the base version ``W0``; the difference is taken in float32, as stored), drawing spare rows from a
    generator seeded with ``seed`` (:func:`adapter_seed`). The extractor (what it sends) and the aggregator (what it
    compares the upload with) call this with the same inputs and get the same adapters."""
    missing = sorted(set(current) ^ set(base))
    if missing:
        raise ValueError(f"target blocks {missing[:5]} are in only one of the current and base versions")
    blocks = {}
    for name, w in current.items():
        if tuple(w.shape) != tuple(base[name].shape):
            raise ValueError(f"{name!r} is {tuple(w.shape)} in the current version and {tuple(base[name].shape)} in "
                             "the base")
        blocks[name] = w.to(torch.float32) - base[name].to(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    return redistribute_blocks(blocks, rank, scaling, generator=generator)


def truncation_error(global_update: Mapping[str, torch.Tensor], plan: SlicePlan, rank: int) -> dict[str, float]:
    """Per target, the Frobenius norm of what a rank-``rank`` download cannot carry: ``sqrt(sum of the squared
    singular values past the rank)`` of the device's block of ``U`` (Eckart-Young)."""
    out: dict[str, float] = {}
    for name, u in global_update.items():
        if name in plan:
            sv = torch.linalg.svdvals(plan[name].take(u).to(torch.float64))
            out[name] = float(sv[rank:].square().sum().sqrt())
    return out


def merge_update(base: Mapping[str, torch.Tensor], global_update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged global state for inference: ``W0 + U`` for every target, other tensors copied (inputs untouched)."""
    out = {name: t.clone() for name, t in base.items()}
    for name, u in global_update.items():
        if name not in base or tuple(base[name].shape) != tuple(u.shape):
            raise ValueError(f"global update {name!r} of shape {tuple(u.shape)} does not match the base "
                             f"({tuple(base[name].shape) if name in base else 'absent'})")
        out[name] = (base[name] + u.to(base[name].dtype))
    return out


def adapter_numel(plan: SlicePlan, targets: Iterable[str], rank: int) -> int:
    """Numbers in one device's adapters: ``rank * (out + in)`` over the target weights its slice keeps."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank is {rank!r}; it must be an integer >= 1")
    total = 0
    for name in target_weight_names(plan, targets):
        shape = plan[name].sub_shape
        if len(shape) != 2:
            raise ValueError(f"LoRA adapts 2-D weights; {name!r} has shape {shape}")
        total += rank * (shape[0] + shape[1])
    return total


def round_bytes(plan: SlicePlan, targets: Iterable[str], rank: int, wire_dtype: str = "float32") -> tuple[int, int]:
    """``(down, up)`` bytes of one federated LoRA round for one device: its rank-``rank`` adapters each way (the
    frozen base slice is cached on the device and not counted; a first download of a model version adds it)."""
    numel = adapter_numel(plan, targets, rank) * itemsize(wire_dtype_name(wire_dtype))
    return numel, numel
