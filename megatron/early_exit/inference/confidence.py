"""Confidence measures: how sure an exit is of its next token (higher = more confident).

Every measure is called the same way, `measure(view)`, on an `ExitView`: the exit's rows'
hidden states, the previous layer's, and their exit logits, computed on first use (for all
rows, or for the rows a gate lets through). A measure that never reads the logits costs
no vocabulary projection when its exit does not fire.

A token leaves at the first active exit whose confidence reaches the threshold. The
logit-based measures (EE-LLM's top-1 probability; CALM's top-1 minus top-2 margin; an
entropy score) lie in [0, 1]; CALM's hidden-state saturation, the cosine similarity of
the exit's hidden state and the previous layer's, lies in [-1, 1]. `learned` is CALM's
classifier (learned_confidence.py): the probability, from the exit's hidden state (and
distribution), that its token is the final layer's. `gated_max_prob` is the top-1
probability behind a gate: a hidden-state-only classifier decides whether the exit's
vocabulary projection is worth computing (score >= the estimator's gate threshold); the
other rows get confidence -inf at the cost of one dot product. Both need an estimator
attached to the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from megatron.early_exit.inference.errors import InferenceConfigError


@dataclass
class ExitView:
    """What an exit test sees of its b rows' newest token."""

    layer_number: int  # the exit's --exit-layer-nums entry
    hidden: Tensor  # [b, h] the hidden state the exit head reads
    previous: Optional[Tensor] = None  # [b, h] the previous layer's (None: before the stage's first layer)
    project: Optional[Callable[[Optional[Tensor]], Tensor]] = None  # row indices [k] (None: all) -> logits [k, V]
    _logits: Optional[Tensor] = field(default=None, repr=False)
    _rows: Optional[Tensor] = field(default=None, repr=False)  # rows of _logits (None: all)
    likely: Optional[List[bool]] = None  # the rows a measure's prefilter let through (None: not asked)

    @classmethod
    def from_logits(cls, logits: Tensor, layer_number: int = 0) -> "ExitView":
        """A view whose exit logits [b, V] are known (calibration, tests)."""
        return cls(layer_number, logits.new_zeros(logits.shape[0], 0), _logits=logits)

    @property
    def logits(self) -> Tensor:
        """[b, V] float32 exit logits of every row (projected once)."""
        if self._logits is None or self._rows is not None:
            self._logits, self._rows = self.project(None).float(), None
        return self._logits

    def logits_of(self, rows: Tensor) -> Tensor:
        """[k, V] exit logits of the rows `rows` [k] only."""
        if self._logits is not None and self._rows is None:
            return self._logits.index_select(0, rows)
        self._logits, self._rows = self.project(rows).float(), rows
        return self._logits

    def projected(self) -> Optional[Tensor]:
        """[b, V] logits of the rows projected so far (zeros elsewhere), None if none were."""
        if self._logits is None or self._rows is None:
            return self._logits
        full = self._logits.new_zeros(self.hidden.shape[0], self._logits.shape[-1])
        return full.index_copy_(0, self._rows, self._logits)


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


def hidden_saturation(view: ExitView) -> Tensor:
    """[b]: cosine similarity of consecutive layers' hidden states (-inf with no previous layer)."""
    if view.previous is None:
        return torch.full((view.hidden.shape[0],), -math.inf, device=view.hidden.device)
    return torch.nn.functional.cosine_similarity(view.hidden.float(), view.previous.float(), dim=-1)


def learned(estimator) -> Callable[[ExitView], Tensor]:
    """CALM's classifier: P(the exit's token is the final layer's)."""
    return lambda view: estimator(view.layer_number, view.logits if estimator.use_logits else None, view.hidden)


def gated_top1_probability(estimator) -> Callable[[ExitView], Tensor]:
    """Top-1 probability where the hidden-state classifier finds a fire likely, -inf elsewhere."""

    def measure(view: ExitView) -> Tensor:
        likely = view.likely  # the decoder's test asked the gate first
        if likely is None:
            likely = estimator.gate(view.layer_number, view.hidden)  # host-side: the rows worth a projection
        if all(likely):
            return top1_probability(view.logits)
        confidence = torch.full((len(likely),), -math.inf, device=view.hidden.device)
        if any(likely):
            rows = torch.tensor([i for i, x in enumerate(likely) if x], device=view.hidden.device)
            confidence[rows] = top1_probability(view.logits_of(rows))
        return confidence

    return measure


@dataclass(frozen=True)
class ConfidenceMeasure:
    name: str
    fn: Optional[Callable[[ExitView], Tensor]]  # view -> [b]; None until bound to a model's estimator
    projects: bool  # a test that does not fire computes the vocabulary projection (of every row)
    needs_estimator: bool = False
    # (layer number, hidden [b, h]) -> the rows worth testing (host bools); the others do not fire,
    # and when none is worth it the test ends there, before any logits (gated_max_prob).
    prefilter: Optional[Callable[[int, Tensor], List[bool]]] = None
    # (layer number, hidden [b, h], threshold) -> which rows fire (host bools), the whole test
    # from the hidden state: the measure's confidence reaches the threshold (learned, hidden only).
    decide: Optional[Callable[[int, Tensor, float], List[bool]]] = None

    def __call__(self, view: ExitView) -> Tensor:
        return self.fn(view)


CONFIDENCE_MEASURES: Dict[str, ConfidenceMeasure] = {
    m.name: m
    for m in (
        ConfidenceMeasure("max_prob", lambda v: top1_probability(v.logits), True),
        ConfidenceMeasure("margin", lambda v: top1_margin(v.logits), True),
        ConfidenceMeasure("entropy", lambda v: entropy_confidence(v.logits), True),
        ConfidenceMeasure("saturation", hidden_saturation, False),
        ConfidenceMeasure("learned", None, True, needs_estimator=True),  # bound to a model's estimator
        ConfidenceMeasure("gated_max_prob", None, False, needs_estimator=True),
    )
}


# The measures every model decodes with: those that need no classifier attached.
PLAIN_MEASURES = tuple(sorted(name for name, m in CONFIDENCE_MEASURES.items() if not m.needs_estimator))


def get_confidence_measure(name: str, model=None) -> ConfidenceMeasure:
    """The measure by name; `learned` and `gated_max_prob` are bound to `model`'s estimator
    (checked only when a model is given)."""
    if name not in CONFIDENCE_MEASURES:
        raise InferenceConfigError(f"confidence measure must be one of {sorted(CONFIDENCE_MEASURES)}, got {name!r}")
    measure = CONFIDENCE_MEASURES[name]
    if measure.needs_estimator and model is not None:
        from megatron.early_exit.inference.learned_confidence import attached

        estimator = attached(model)
        if estimator is None:
            raise InferenceConfigError(
                f"confidence measure {name!r} needs a confidence estimator: pass --confidence-estimator FILE "
                "(written by tools/train_confidence_estimator.py"
                + (" --hidden-state-only)" if name != "learned" else ")")
            )
        if name == "learned":
            decide = None if estimator.use_logits else estimator.gate
            return ConfidenceMeasure(name, learned(estimator), estimator.use_logits, True, decide=decide)
        if estimator.use_logits:
            raise InferenceConfigError(
                f"confidence measure {name!r} gates with a hidden-state classifier: "
                "--confidence-estimator must be trained with --hidden-state-only"
            )
        return ConfidenceMeasure(name, gated_top1_probability(estimator), False, True, prefilter=estimator.gate)
    return measure
