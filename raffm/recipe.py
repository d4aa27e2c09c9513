"""The client recipe: what a device trains inside its sub-model besides plain fine-tuning (part of an assignment).

Pure data, shared by the strategy that chooses it (:mod:`raffm.strategy`), the cost model that prices it
(:mod:`raffm.costs`), the local training loop that runs it (:mod:`raffm.training`) and the wire that carries it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raffm.spec import ElasticSpec

# raffm.lora is imported where a LoRA recipe needs it: it imports torch, and tickets (hence every service's command
# line) carry recipes without training anything.
if TYPE_CHECKING:
    from raffm.lora import LoRAConfig


@dataclass(frozen=True)
class Recipe:
    """``frozen``: names of sub-model tensors never trained (no gradient, no optimizer state, no delta uploaded).

    ``nested``: smaller cuts of the device's own spec, smallest first, trained in the same steps on views of the same
    weights (the sandwich rule of slimmable networks): every step trains the device's spec on the labels, then the
    smallest nested cut and ``sampled`` of the others drawn at random, each learning from the device spec's logits
    (in-place distillation) with weight ``distill`` and from the labels with weight ``1 - distill``.

    ``distill_hidden``: weight of the mean squared error between every layer's output in the cut and in the device's
    spec (the cut learns to compute the spec's representations, not only its prediction).

    ``frozen_dtype``: the precision the device stores the frozen vocabulary tables at ("float16" halves them; their
    lookups are cast back to float32), and receives them at (:meth:`download_dtypes`); every other frozen tensor
    stays float32 on the device. ``base_dtype``: the precision every other frozen tensor (with LoRA: every base tensor)
    travels down at, float32 meaning the job's wire dtype; the device computes with it in float32 (rounding to float16
    is a relative error of at most 2^-11). ``checkpointing``: activation checkpointing (each layer's activations are
    recomputed in the backward pass: about a third more compute for a fraction of the activation memory).

    ``prior_correction`` tau > 0 (classification only): the label loss of the device's spec sees its logits plus
    tau x the log of the device's own label prior (logit adjustment, as in FedLC), so a device whose data is mostly
    one label does not teach the shared model that label's prior; the logits themselves, used at inference and as
    the nested cuts' teacher, are left as they are. 0: plain cross-entropy.

    ``dropout``: False switches every dropout of the sub-model off for local training (True: the model's own rates).
    Without dropout autograd keeps no masks, so a step needs less memory (the cost model prices it) and less time.

    ``lr_scale``: the device trains at this multiple of the job's learning rate (a probe round's freshly initialised
    task head learns at a larger step than a pretrained body can take).

    ``lora_rank`` > 0: parameter-efficient training (:mod:`raffm.lora`): rank-``lora_rank`` adapters on the
    ``lora_targets`` modules (scaling ``lora_alpha / lora_rank``), every base tensor frozen; a round then moves
    adapters, not the slice (:mod:`raffm.lora_fed`). 0: plain fine-tuning.
    """

    frozen: frozenset[str] = frozenset()
    nested: tuple[ElasticSpec, ...] = ()
    sampled: int = 1
    distill: float = 1.0
    frozen_dtype: str = "float32"
    base_dtype: str = "float32"
    checkpointing: bool = False
    distill_hidden: float = 0.0
    prior_correction: float = 0.0
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    lora_alpha: float = 16.0
    lr_scale: float = 1.0
    dropout: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"recipe lora_rank is {self.lora_rank!r}; it must be an integer >= 0 (0: no LoRA)")
        if self.lora_rank:
            from raffm.lora import LoRAConfig

            LoRAConfig(rank=self.lora_rank, targets=self.lora_targets, alpha=self.lora_alpha)  # validates them
            if self.nested:
                raise ValueError("a LoRA recipe cannot train nested cuts (not supported yet)")
        if not (self.lr_scale > 0 and math.isfinite(self.lr_scale)):
            raise ValueError(f"recipe lr_scale is {self.lr_scale}; it must be a positive number")
        if self.sampled < 0:
            raise ValueError(f"recipe sampled is {self.sampled}; it must be >= 0")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"recipe distill is {self.distill}; it must be between 0 and 1")
        if not self.distill_hidden >= 0.0:
            raise ValueError(f"recipe distill_hidden is {self.distill_hidden}; it must be >= 0")
        if not self.prior_correction >= 0.0:
            raise ValueError(f"recipe prior_correction is {self.prior_correction}; it must be >= 0")
        for name in ("frozen_dtype", "base_dtype"):
            if getattr(self, name) not in ("float32", "float16", "bfloat16"):
                raise ValueError(f"recipe {name} is {getattr(self, name)!r}; it must be float32, float16 or bfloat16")

    @property
    def lora(self) -> LoRAConfig | None:
        """The LoRA settings, or None for plain fine-tuning."""
        if not self.lora_rank:
            return None
        from raffm.lora import LoRAConfig

        return LoRAConfig(rank=self.lora_rank, targets=tuple(self.lora_targets), alpha=self.lora_alpha)

    def download_dtypes(self, names: Iterable[str], vocab: Iterable[str]) -> dict[str, str]:
        """Of a download's tensors ``names``, those that travel at a dtype other than the job's wire dtype: the frozen
        ones among ``vocab`` (the slice's vocabulary tables, :meth:`raffm.arch.Adapter.vocab_tensors`) at
        ``frozen_dtype`` when that is not float32 (the device stores them at that precision anyway, so the narrower
        download loses nothing), every other frozen tensor (with LoRA: every base tensor) at ``base_dtype`` when that
        is not float32."""
        dtypes = {}
        if self.base_dtype != "float32":
            from raffm.lora import A_SUFFIX, B_SUFFIX

            dtypes = {n: self.base_dtype for n in names
                      if n in self.frozen or (self.lora_rank and not n.endswith((A_SUFFIX, B_SUFFIX)))}
        if self.frozen_dtype != "float32":
            dtypes.update({name: self.frozen_dtype for name in vocab if name in self.frozen})
        return dtypes

    @property
    def nested_per_step(self) -> int:
        """Nested cuts trained in every step besides the device's own spec."""
        return min(len(self.nested), 1 + self.sampled)

    def to_dict(self) -> dict[str, Any]:
        return {"frozen": sorted(self.frozen), "nested": [s.to_dict() for s in self.nested], "sampled": self.sampled,
                "distill": self.distill, "frozen_dtype": self.frozen_dtype, "base_dtype": self.base_dtype,
                "checkpointing": self.checkpointing,
                "distill_hidden": self.distill_hidden, "prior_correction": self.prior_correction,
                "lora_rank": self.lora_rank,
                "lora_targets": list(self.lora_targets), "lora_alpha": self.lora_alpha, "lr_scale": self.lr_scale,
                "dropout": self.dropout}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        return cls(frozen=frozenset(data.get("frozen", ())),
                   nested=tuple(ElasticSpec.from_dict(s) for s in data.get("nested", ())),
                   sampled=int(data.get("sampled", 1)), distill=float(data.get("distill", 1.0)),
                   frozen_dtype=str(data.get("frozen_dtype", "float32")),
                   base_dtype=str(data.get("base_dtype", "float32")),
                   checkpointing=bool(data.get("checkpointing", False)),
                   distill_hidden=float(data.get("distill_hidden", 0.0)),
                   prior_correction=float(data.get("prior_correction", 0.0)),
                   lora_rank=int(data.get("lora_rank", 0)), lora_targets=tuple(data.get("lora_targets", ())),
                   lora_alpha=float(data.get("lora_alpha", 16.0)), lr_scale=float(data.get("lr_scale", 1.0)),
                   dropout=bool(data.get("dropout", True)))
