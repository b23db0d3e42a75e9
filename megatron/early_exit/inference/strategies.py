"""Decoding strategies: what `generate` does after the prompt.

    FullDepth()                                   every token through every layer
    EarlyExit(threshold, measure, kv, exit_layers) leave at the first confident exit;
        kv="recompute": deeper K/V of exited tokens are computed by the next deeper pass (EE-LLM)
        kv="propagate": they are filled at once from the exit hidden state (CALM)
        kv="pipeline": the exited token goes on through the deeper layers, on later pipeline
                       stages while the first starts the next token (EE-LLM's pipeline-based
                       method; with FullDepth, what runs on a model split into pipeline stages)
    SelfSpeculative(exit_layer, num_draft)        draft with an exit, verify with the full model (LayerSkip)

All run through `generate(model, prompts, strategy, ...)` and return a GenerationResult.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from megatron.early_exit.inference.confidence import get_confidence_measure
from megatron.early_exit.inference.decoder import FULL_DEPTH, Decoder, ExitPoint, ExitPolicy
from megatron.early_exit.inference.errors import InferenceConfigError

KV_STRATEGIES = ("recompute", "propagate", "pipeline")


def _exit_point(decoder: Decoder, layer_number: int) -> ExitPoint:
    if layer_number not in decoder.exit_points:
        raise InferenceConfigError(
            f"exit layer {layer_number} is not an exit of this model (its exits: {sorted(decoder.exit_points)})"
        )
    return decoder.exit_points[layer_number]


@dataclass(frozen=True)
class FullDepth:
    name = "full"

    def exit_policy(self, decoder: Decoder) -> ExitPolicy:
        return FULL_DEPTH


@dataclass(frozen=True)
class EarlyExit:
    threshold: float = 0.9
    """A token leaves at the first active exit whose confidence >= threshold; above 1, never."""

    measure: str = "max_prob"
    """One of confidence.CONFIDENCE_MEASURES: max_prob, margin, entropy, saturation, learned."""

    kv: str = "recompute"
    """How tokens that left early get K/V in deeper layers: recompute, propagate or pipeline."""

    exit_layers: Optional[Tuple[int, ...]] = None
    """Exits allowed to fire (by --exit-layer-nums entry); None: all of them."""

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and self.threshold >= 0):  # also rejects NaN
            raise InferenceConfigError(f"early-exit threshold must be a number >= 0 (above 1: never exit), got {self.threshold!r}")
        get_confidence_measure(self.measure)
        if self.kv not in KV_STRATEGIES:
            raise InferenceConfigError(f"kv must be one of {KV_STRATEGIES}, got {self.kv!r}")

    @property
    def name(self) -> str:
        return f"early_exit[{self.kv}]"

    def exit_policy(self, decoder: Decoder) -> ExitPolicy:
        if not decoder.exit_points:
            raise InferenceConfigError("early exit needs a model with exits (--exit-layer-nums)")
        layers = sorted(decoder.exit_points) if self.exit_layers is None else list(self.exit_layers)
        points = [_exit_point(decoder, n) for n in layers]
        if self.threshold > 1:  # no confidence measure exceeds 1: skip the exit heads entirely
            return FULL_DEPTH
        return ExitPolicy({p.depth: p for p in points}, float(self.threshold),
                          get_confidence_measure(self.measure, decoder.model), self.kv == "propagate")


@dataclass(frozen=True)
class SelfSpeculative:
    exit_layer: int
    """The exit that drafts: the layers up to it and its head make the draft model."""

    num_draft: int = 4
    """Tokens drafted per round, verified together by one full-depth pass."""

    def __post_init__(self):
        if self.num_draft < 1:
            raise InferenceConfigError(f"num_draft must be >= 1, got {self.num_draft}")

    @property
    def name(self) -> str:
        return f"self_speculative[{self.exit_layer}x{self.num_draft}]"

    def draft_policy(self, decoder: Decoder) -> ExitPolicy:
        point = _exit_point(decoder, self.exit_layer)
        return ExitPolicy({point.depth: point}, -math.inf)
