"""The ways of running a model that an evaluation compares, and teacher-forced scoring under each.

    full             every token through every layer
    exit K           every token from exit K's head
    early exit T     each token from the first exit whose top-1 probability reaches T,
                     else from the final layer (EE-LLM's confidence rule)

Scoring a known sequence under early exit needs no decoding: with KV recomputation the
deeper layers see exactly the states full-depth decoding gives them, so each position's
distribution is that of the first exit confident there. Every exit's head and the final one,
all from one forward (`score_heads`), score every position under every setting (`combine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from megatron.early_exit.inference.errors import InferenceConfigError
from megatron.early_exit.inference.scoring import ScoreResult, score_layers
from megatron.early_exit.inference.strategies import EarlyExit, FullDepth


@dataclass(frozen=True)
class Setting:
    exit_layer: Optional[int] = None
    """Score and generate with this exit's head alone (None: not an exit setting)."""

    threshold: Optional[float] = None
    """Early-exit decoding at this threshold (max_prob confidence); None: not early exit."""

    kv: str = "recompute"
    """How early-exit decoding fills deeper K/V (pipeline over pipeline stages)."""

    @property
    def name(self) -> str:
        if self.exit_layer is not None:
            return f"exit {self.exit_layer}"
        if self.threshold is not None:
            return f"early exit {self.threshold:g}"
        return "full"

    @property
    def is_full(self) -> bool:
        return self.exit_layer is None and self.threshold is None

    def strategy(self):
        """The decoding strategy of this setting (an exit alone: threshold 0 at that exit only;
        the prompt's first token still comes from the prefill at full depth)."""
        if self.exit_layer is not None:
            return EarlyExit(0.0, "max_prob", self.kv, (self.exit_layer,))
        if self.threshold is not None:
            return EarlyExit(self.threshold, "max_prob", self.kv)
        return FullDepth()


def build_settings(
    model, exit_layers: Optional[Sequence[int]], thresholds: Sequence[float], pipeline: bool = False
) -> List[Setting]:
    """Full depth first, then each exit alone, then each threshold (highest first)."""
    exits = list(model.ee_config.exit_layer_nums)
    kv = "pipeline" if pipeline else "recompute"
    if (exit_layers or thresholds) and not exits:
        raise InferenceConfigError("--exit-layers and --thresholds need a model with exits (it has none)")
    for layer in exit_layers or ():
        if layer not in exits:
            raise InferenceConfigError(f"--exit-layers {layer}: not an exit of this model (its exits: {exits})")
    for t in thresholds:
        if not (isinstance(t, (int, float)) and t >= 0 and not math.isnan(t)):
            raise InferenceConfigError(f"--thresholds {t}: must be a number >= 0 (above 1: never exit)")
    return (
        [Setting(kv=kv)]
        + [Setting(exit_layer=k, kv=kv) for k in exit_layers or ()]
        + [Setting(threshold=float(t), kv=kv) for t in sorted(thresholds, reverse=True)]
    )


@dataclass
class SettingScores:
    """Per sequence, per position t: log p(seq[t+1] | seq[:t+1]), whether seq[t+1] is the
    argmax, and the depth (layers run) of the head that scored it."""

    logprobs: List[List[float]]
    greedy: List[List[bool]]
    depths: List[List[int]]


def needed_layers(model, setting: Setting) -> List[int]:
    """The heads whose scores `setting` reads: its exit, or the final layer (and, for early
    exit at a threshold that can fire, every exit)."""
    num_layers = model.config.num_layers
    if setting.exit_layer is not None:
        return [setting.exit_layer]
    if setting.threshold is None or setting.threshold > 1:  # no confidence exceeds 1: full depth
        return [num_layers]
    return sorted(model.ee_config.exit_layer_nums) + [num_layers]


def score_heads(
    model,
    sequences: Sequence[Sequence[int]],
    layers: Sequence[int],
    batch_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> Dict[int, ScoreResult]:
    """Every head's scores from one pass (top-1 kept: the confidence), shared by every setting."""
    return score_layers(model, sequences, layers, 1, batch_size, vocab_size)


def combine(model, heads: Dict[int, ScoreResult], setting: Setting) -> SettingScores:
    """`setting`'s scores from the heads' scores (needed_layers of it must be among them)."""
    layers = needed_layers(model, setting)
    final = heads[layers[-1]]
    depth = _depth(model, final.exit_layer)
    logprobs = [list(row) for row in final.logprobs]
    greedy = [list(row) for row in final.greedy]
    depths = [[depth] * len(row) for row in final.logprobs]
    exits = [heads[k] for k in layers[:-1]]  # in layer order: the first confident one wins
    for i, row in enumerate(logprobs):
        for t in range(len(row)):
            for ex in exits:
                if math.exp(ex.top_logprobs[i][t][0]) >= setting.threshold:
                    row[t], greedy[i][t], depths[i][t] = (
                        ex.logprobs[i][t],
                        ex.greedy[i][t],
                        _depth(model, ex.exit_layer),
                    )
                    break
    return SettingScores(logprobs, greedy, depths)


def score_setting(
    model,
    sequences: Sequence[Sequence[int]],
    setting: Setting,
    batch_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> SettingScores:
    return combine(model, score_heads(model, sequences, needed_layers(model, setting), batch_size, vocab_size), setting)


def _depth(model, layer: int) -> int:
    """Layers a token goes through before `layer`'s head reads it (one less with --pre-exit)."""
    if layer == model.config.num_layers:
        return layer
    return layer - int(model.ee_config.pre_exit)
