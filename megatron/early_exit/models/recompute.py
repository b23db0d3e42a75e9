"""Activation recomputation: which activations a training run recomputes in backward.

A training setting, not part of the model description (checkpoints never store it):
the same weights train with or without it and give the same gradients.

Megatron-LM's semantics, carried into megatron-core's TransformerConfig:
  selective  megatron-core's attention recomputes its core attention itself
  full       whole layers are recomputed from their inputs, in units chosen by the method:
             uniform  this stage's layers in consecutive chunks of `num_layers`
             block    only the first `num_layers` layers of the stage, one by one
             (with the interleaved pipeline: of each model chunk, by its local layer index)
Exit heads (`exit_heads`) are recomputed from their input state in backward, so that an
exit's vocabulary-sized logits live only while its own backward runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from megatron.early_exit.errors import ConfigError

GRANULARITIES = ("full", "selective")
METHODS = ("uniform", "block")


@dataclass(frozen=True)
class RecomputeConfig:
    granularity: Optional[str] = None
    """None (keep every activation), "full" or "selective" (--recompute-granularity)."""

    method: Optional[str] = None
    """How full recomputation picks layers: "uniform" or "block" (--recompute-method)."""

    num_layers: Optional[int] = None
    """Layers per recomputed chunk (uniform) or recomputed layers per stage (block)
    (--recompute-num-layers)."""

    distribute_saved_activations: bool = False
    """Split the saved layer inputs across the tensor-parallel group (--distribute-saved-activations)."""

    exit_heads: bool = False
    """Recompute each exit head (and its logits) in backward (--recompute-exit-heads)."""

    def __post_init__(self):
        if self.granularity not in (None,) + GRANULARITIES:
            raise ConfigError(
                f"--recompute-granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
            )
        if self.granularity == "full":
            if self.method not in METHODS:
                raise ConfigError("--recompute-granularity full needs --recompute-method uniform or block")
            if self.num_layers is None or self.num_layers < 1:
                raise ConfigError(
                    f"--recompute-granularity full needs --recompute-num-layers >= 1, got {self.num_layers}"
                )
        elif self.method is not None or self.num_layers is not None:
            raise ConfigError("--recompute-method and --recompute-num-layers need --recompute-granularity full")

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> "RecomputeConfig":
        granularity = values.get("recompute_granularity")
        if values.get("recompute_activations"):  # Megatron-LM's alias
            if granularity not in (None, "selective"):
                raise ConfigError(f"--recompute-activations means --recompute-granularity selective, got {granularity}")
            granularity = "selective"
        return cls(
            granularity,
            values.get("recompute_method"),
            values.get("recompute_num_layers"),
            bool(values.get("distribute_saved_activations")),
            bool(values.get("recompute_exit_heads")),
        )

    def validate_layout(
        self, layers_per_stage: int, tensor_model_parallel_size: int, sequence_parallel: bool, num_model_chunks: int = 1
    ) -> None:
        """Units count the layers of one model chunk (a stage's whole layers without the
        interleaved pipeline), as megatron-core's TransformerBlock of each chunk does."""
        per_chunk, where = (
            layers_per_stage // num_model_chunks,
            "model chunk" if num_model_chunks > 1 else "pipeline stage",
        )
        if self.granularity == "full" and self.num_layers > per_chunk:
            raise ConfigError(
                f"--recompute-num-layers ({self.num_layers}) exceeds the layers of a {where} ({per_chunk})"
            )
        if self.distribute_saved_activations and (tensor_model_parallel_size == 1 or sequence_parallel):
            raise ConfigError(
                "--distribute-saved-activations needs --tensor-model-parallel-size > 1 and no --sequence-parallel"
            )

    def transformer_config_kwargs(self) -> Dict[str, Any]:
        """The fields of megatron-core's TransformerConfig it sets."""
        return dict(
            recompute_granularity=self.granularity,
            recompute_method=self.method,
            recompute_num_layers=self.num_layers,
            distribute_saved_activations=self.distribute_saved_activations,
        )


def recompute_units(
    num_local_layers: int, granularity: Optional[str], method: Optional[str], num_layers: Optional[int]
) -> List[Tuple[int, int, bool]]:
    """This stage's layers as (start, end, recomputed) runs of local layer indices, as
    megatron-core's TransformerBlock chooses them."""
    if granularity != "full":
        return [(0, num_local_layers, False)] if num_local_layers else []
    if method == "uniform":
        return [(i, min(i + num_layers, num_local_layers), True) for i in range(0, num_local_layers, num_layers)]
    units = [(i, i + 1, True) for i in range(min(num_layers, num_local_layers))]
    if num_layers < num_local_layers:
        units.append((num_layers, num_local_layers, False))
    return units
