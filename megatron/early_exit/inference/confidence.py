"""Confidence measures: how sure an exit is of its next token (higher = more confident).

A token leaves at the first active exit whose confidence reaches the threshold. The
logit-based measures (EE-LLM's top-1 probability; CALM's top-1 minus top-2 margin; an
entropy score) lie in [0, 1]; CALM's hidden-state saturation, the cosine similarity of
the exit's hidden state and the previous layer's, lies in [-1, 1] and needs no logits,
so an exit that does not fire never projects onto the vocabulary. `learned` is CALM's
classifier (learned_confidence.py): the probability, from the exit's hidden state and
distribution, that its token is the final layer's; it needs an estimator attached to the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from megatron.early_exit.inference.errors import InferenceConfigError


def top1_probability(logits: Tensor) -> Tensor:
    """[b, V] -> [b]: the softmax maximum."""
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def top1_margin(logits: Tensor) -> Tensor:
    """[b, V] -> [b]: top-1 minus top-2 probability."""
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def entropy_confidence(logits: Tensor) -> Tensor:
    """[b, V] -> [b]: 1 - H(p) / log V, 1 for a one-hot distribution, 0 for a uniform one."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return 1.0 - entropy / math.log(logits.shape[-1])


def hidden_saturation(hidden: Tensor, previous: Tensor) -> Tensor:
    """[b, h] twice -> [b]: cosine similarity of consecutive layers' hidden states."""
    return torch.nn.functional.cosine_similarity(hidden.float(), previous.float(), dim=-1)


@dataclass(frozen=True)
class ConfidenceMeasure:
    name: str
    uses_logits: bool  # False: called as fn(hidden, previous_hidden)
    fn: Optional[Callable[..., Tensor]]
    learned: bool = False  # called as fn(exit layer number, logits, hidden)


CONFIDENCE_MEASURES: Dict[str, ConfidenceMeasure] = {
    m.name: m
    for m in (
        ConfidenceMeasure("max_prob", True, top1_probability),
        ConfidenceMeasure("margin", True, top1_margin),
        ConfidenceMeasure("entropy", True, entropy_confidence),
        ConfidenceMeasure("saturation", False, hidden_saturation),
        ConfidenceMeasure("learned", True, None, learned=True),  # bound to a model's estimator
    )
}


def get_confidence_measure(name: str, model=None) -> ConfidenceMeasure:
    """The measure by name; `learned` is bound to `model`'s estimator (checked only when a
    model is given)."""
    if name not in CONFIDENCE_MEASURES:
        raise InferenceConfigError(f"confidence measure must be one of {sorted(CONFIDENCE_MEASURES)}, got {name!r}")
    measure = CONFIDENCE_MEASURES[name]
    if measure.learned and model is not None:
        from megatron.early_exit.inference.learned_confidence import attached

        estimator = attached(model)
        if estimator is None:
            raise InferenceConfigError(
                "confidence measure 'learned' needs a confidence estimator: pass --confidence-estimator FILE "
                "(written by tools/train_confidence_estimator.py)")
        measure = ConfidenceMeasure(name, True, estimator, learned=True)
    return measure
