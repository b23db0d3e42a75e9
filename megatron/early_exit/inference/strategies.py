"""Decoding strategies: what `generate` (and the continuous-batching engine) does after the prompt.

    FullDepth()                                   every token through every layer
    EarlyExit(threshold, measure, kv, exit_layers, exit_thresholds) leave at the first confident exit
        (exit_thresholds: a threshold per exit, e.g. {2: 0.95, 4: 0.8}, from tools/calibrate_threshold.py --per-exit);
        kv="recompute": deeper K/V of exited tokens are computed by the next deeper pass (EE-LLM)
        kv="propagate": they are filled at once from the exit hidden state (CALM)
        kv="pipeline": the exited token goes on through the deeper layers, on later pipeline
                       stages while the first starts the next token (EE-LLM's pipeline-based
                       method; with FullDepth, what runs on a model split into pipeline stages)
    SelfSpeculative(exit_layer, num_draft, draft_threshold, dynamic) draft with an exit, verify with the full model
        (LayerSkip), greedy or sampled (rejection sampling keeps the full model's distribution); a row's drafting
        stops after a draft below draft_threshold (adaptive draft length); dynamic: the exit and the draft length
        are picked per round from online acceptance rates (DEL), up to num_draft

All run through `generate(model, prompts, strategy, ...)` and return a GenerationResult.
A strategy owns its behaviour, so that callers dispatch to it without asking its type:
    check(sampling)         refuses sampling it cannot decode with
    exit_policy(decoder)    where its rows leave (the engine runs each row under its own)
    decode(decoder, t)      its loop after the prefill, on the whole model
    stage_options(model)    its pipeline_generate options over pipeline stages (or a refusal)
    over_stages             it runs through pipeline_generate even on one stage
    batchable               it runs in the engine's continuous batch (else in a lane of its own)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple, Union

from megatron.early_exit.inference.confidence import get_confidence_measure
from megatron.early_exit.inference.decode import decode_tokens
from megatron.early_exit.inference.decoder import FULL_DEPTH, Decoder, ExitPoint, ExitPolicy
from megatron.early_exit.inference.errors import InferenceConfigError
from megatron.early_exit.inference.speculative import speculative_decode

KV_STRATEGIES = ("recompute", "propagate", "pipeline")
DEFAULT_EARLY_EXIT_THRESHOLD = 0.8  # EarlyExit's, the server's and the CLI's


def _exit_point(decoder: Decoder, layer_number: int) -> ExitPoint:
    if layer_number not in decoder.exit_points:
        raise InferenceConfigError(
            f"exit layer {layer_number} is not an exit of this model (its exits: {sorted(decoder.exit_points)})"
        )
    return decoder.exit_points[layer_number]


@dataclass(frozen=True)
class FullDepth:
    name = "full"
    over_stages = False
    batchable = True

    def check(self, sampling) -> None:
        pass

    def exit_policy(self, decoder: Decoder) -> ExitPolicy:
        return FULL_DEPTH

    def decode(self, decoder: Decoder, transcript) -> None:
        decode_tokens(decoder, transcript, self.exit_policy(decoder))

    def stage_options(self, model) -> dict:
        return dict(exit_layers=None, threshold=math.inf, measure=None, exit_thresholds=None)


@dataclass(frozen=True)
class EarlyExit:
    threshold: float = DEFAULT_EARLY_EXIT_THRESHOLD
    """A token leaves at the first active exit whose confidence >= threshold; above 1, never."""

    measure: str = "max_prob"
    """One of confidence.CONFIDENCE_MEASURES: max_prob, margin, entropy, saturation, learned."""

    kv: str = "recompute"
    """How tokens that left early get K/V in deeper layers: recompute, propagate or pipeline."""

    exit_layers: Optional[Tuple[int, ...]] = None
    """Exits allowed to fire (by --exit-layer-nums entry); None: all of them."""

    exit_thresholds: Optional[Union[Tuple[Tuple[int, float], ...], Mapping[int, float]]] = None
    """Thresholds of single exits (by --exit-layer-nums entry), overriding `threshold` there;
    given as a dict, kept as sorted (exit, threshold) pairs so that the strategy stays hashable."""

    def __post_init__(self):
        _check_threshold("early-exit threshold", self.threshold)
        get_confidence_measure(self.measure)
        if self.kv not in KV_STRATEGIES:
            raise InferenceConfigError(f"kv must be one of {KV_STRATEGIES}, got {self.kv!r}")
        if self.exit_thresholds is not None:
            pairs = dict(self.exit_thresholds).items()
            for num, value in pairs:
                if isinstance(num, bool) or not isinstance(num, int):
                    raise InferenceConfigError(
                        f"exit_thresholds: exit {num!r} must be an --exit-layer-nums entry (an int)"
                    )
                _check_threshold(f"exit_thresholds[{num}]", value)
            object.__setattr__(self, "exit_thresholds", tuple(sorted((n, float(v)) for n, v in pairs)) or None)

    @property
    def name(self) -> str:
        return f"early_exit[{self.kv},per-exit]" if self.exit_thresholds else f"early_exit[{self.kv}]"

    def threshold_of(self, layer_number: int) -> float:
        """The threshold at exit `layer_number` (an --exit-layer-nums entry)."""
        return dict(self.exit_thresholds or ()).get(layer_number, float(self.threshold))

    def firing_exits(self, model_exits: Sequence[int]) -> List[int]:
        """The exits among `model_exits` (the model's --exit-layer-nums) that may fire: active
        (`exit_layers`) and with a threshold <= 1 (no confidence measure exceeds 1)."""
        model_exits = sorted(int(n) for n in model_exits)
        for field_name, nums in (
            ("exit_layers", self.exit_layers or ()),
            ("exit_thresholds", [n for n, _ in self.exit_thresholds or ()]),
        ):
            unknown = sorted(set(nums) - set(model_exits))
            if unknown:
                raise InferenceConfigError(
                    f"{field_name}: exit {unknown[0]} is not an exit of this model (its exits: {model_exits})"
                )
        active = model_exits if self.exit_layers is None else sorted(self.exit_layers)
        return [n for n in active if self.threshold_of(n) <= 1]

    @property
    def over_stages(self) -> bool:
        return self.kv == "pipeline"

    @property
    def batchable(self) -> bool:
        return self.kv != "pipeline"

    def check(self, sampling) -> None:
        pass

    def exit_policy(self, decoder: Decoder) -> ExitPolicy:
        if not decoder.exit_points:
            raise InferenceConfigError("early exit needs a model with exits (--exit-layer-nums)")
        firing = self.firing_exits(decoder.exit_points)
        return decoder.exit_policy(
            firing,
            float(self.threshold),
            get_confidence_measure(self.measure, decoder.model),
            dict(self.exit_thresholds or ()),
            propagate=self.kv == "propagate",
        )

    def decode(self, decoder: Decoder, transcript) -> None:
        decode_tokens(decoder, transcript, self.exit_policy(decoder))

    def stage_options(self, model) -> dict:
        if self.kv != "pipeline":
            raise InferenceConfigError(
                f"early exit over pipeline stages completes the K/V of exited tokens on the later "
                f"stages: use kv='pipeline', not {self.kv!r}"
            )
        if not model.ee_config.exit_layer_nums:
            raise InferenceConfigError("early exit needs a model with exits (--exit-layer-nums)")
        firing = self.firing_exits(model.ee_config.exit_layer_nums)
        if not firing:  # every threshold above 1: full depth
            return FullDepth().stage_options(model)
        return dict(
            exit_layers=firing,
            threshold=float(self.threshold),
            measure=get_confidence_measure(self.measure, model),
            exit_thresholds={n: self.threshold_of(n) for n in firing},
        )


def _check_threshold(what: str, value) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value >= 0):  # also rejects NaN
        raise InferenceConfigError(f"{what} must be a number >= 0 (above 1: never exit), got {value!r}")


@dataclass(frozen=True)
class SelfSpeculative:
    exit_layer: int
    """The exit that drafts: the layers up to it and its head make the draft model."""

    num_draft: int = 4
    """Most tokens drafted per round, verified together by one full-depth pass."""

    draft_threshold: float = 0.0
    """A row stops drafting after a draft whose probability at the exit is below this (0: never)."""

    dynamic: bool = False
    """Pick the drafting exit (any of the model's, starting at exit_layer) and the draft length (<= num_draft)
    before each round from online acceptance rates (DEL)."""

    def __post_init__(self):
        if self.num_draft < 1:
            raise InferenceConfigError(f"num_draft must be >= 1, got {self.num_draft}")
        if isinstance(self.draft_threshold, bool) or not (
            isinstance(self.draft_threshold, (int, float)) and 0 <= self.draft_threshold <= 1
        ):
            raise InferenceConfigError(f"draft_threshold must be a number in [0, 1], got {self.draft_threshold!r}")

    @property
    def name(self) -> str:
        stop = f">{self.draft_threshold:g}" if self.draft_threshold else ""
        return f"self_speculative[{'dynamic ' if self.dynamic else ''}{self.exit_layer}x{self.num_draft}{stop}]"

    over_stages = False
    batchable = False

    def check(self, sampling) -> None:
        if sampling.ban_after:
            raise InferenceConfigError(
                "self-speculative decoding verifies the full model's tokens: it takes no banned tokens (ban_after)"
            )

    def decode(self, decoder: Decoder, transcript) -> None:
        speculative_decode(decoder, transcript, self)

    def stage_options(self, model) -> dict:
        raise InferenceConfigError(
            f"{self.name} needs the whole model on one stage; pipeline stages run FullDepth or EarlyExit(kv='pipeline')"
        )

    def draft_policy(self, decoder: Decoder, exit_layer: Optional[int] = None) -> ExitPolicy:
        point = _exit_point(decoder, self.exit_layer if exit_layer is None else exit_layer)
        return ExitPolicy({point.depth: point}, -math.inf)
