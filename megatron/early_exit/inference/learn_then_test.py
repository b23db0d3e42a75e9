"""Calibration with a guarantee: CALM's Learn-then-Test (Schuster et al. 2022, after
Angelopoulos et al. 2021, "Learn then Test").

The user asks that decoding keeps consistency (or agreement) with full depth of at least
1 - delta, with confidence 1 - epsilon over the draw of the calibration prompts. Risk is
the expected per-prompt loss L = 1 - (the prompt's consistency or agreement), in [0, 1].

  learn  on the first half of the prompts, a path of per-exit thresholds from
         conservative to aggressive: for each precision on `PRECISIONS` (0.999 down to
         0.8), the thresholds at which the tokens leaving each exit agree with the final
         layer at that rate (calibration.per_exit_thresholds);
  test   on the other half, each candidate in that order is decoded and gets a p-value for
         H0 "its risk exceeds delta" from its empirical risk (Hoeffding-Bentkus); testing
         stops at the first candidate whose p-value exceeds epsilon (fixed-sequence testing
         controls the family-wise error at epsilon without a multiplicity correction), and
         the last candidate before it is the answer. If the first fails, no exit fires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

PRECISIONS = (0.999, 0.995, 0.99, 0.985, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.85, 0.8)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
        for i in range(k + 1)
    ]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def _kl_bernoulli(a: float, b: float) -> float:
    """h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))."""
    first = a * math.log(a / b) if a > 0 else 0.0
    second = (1 - a) * math.log((1 - a) / (1 - b)) if a < 1 else 0.0
    return first + second


def hoeffding_bentkus_pvalue(risk: float, n: int, delta: float) -> float:
    """p-value of H0 "true risk > delta" from the mean `risk` of n losses in [0, 1]:
    min(exp(-n h1(min(risk, delta), delta)), e * P(Binomial(n, delta) <= ceil(n risk)))."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    hoeffding = math.exp(-n * _kl_bernoulli(min(risk, delta), delta))
    bentkus = math.e * binomial_cdf(math.ceil(n * risk - 1e-9), n, delta)
    return min(1.0, hoeffding, bentkus)


@dataclass
class TestedCandidate:
    label: str
    risk: float
    p_value: float
    valid: bool


def fixed_sequence_test(candidates: Sequence, p_value: Callable[[object], TestedCandidate], epsilon: float):
    """Test `candidates` in order (conservative first) until one's p-value exceeds epsilon.
    Returns (index of the last valid candidate or -1, the tested candidates in order)."""
    tested: List[TestedCandidate] = []
    last = -1
    for i, candidate in enumerate(candidates):
        result = p_value(candidate)
        result.valid = result.p_value <= epsilon
        tested.append(result)
        if not result.valid:
            break
        last = i
    return last, tested


@dataclass
class GuaranteedThresholds:
    criterion: str  # "consistency" or "agreement"
    target: float  # 1 - delta
    confidence: float  # 1 - epsilon
    measure: str
    exit_thresholds: Dict[int, float]  # {} when no candidate is valid: no exit fires
    num_learn: int
    num_test: int
    tested: List[TestedCandidate] = field(default_factory=list)

    def to_json(self) -> dict:
        """What tools/calibrate_threshold.py writes and the server's --exit-thresholds-file reads."""
        return {
            "exit_thresholds": {str(k): v for k, v in self.exit_thresholds.items()},
            "measure": self.measure,
            "criterion": self.criterion,
            "target": self.target,
            "confidence": self.confidence,
            "num_learn_prompts": self.num_learn,
            "num_test_prompts": self.num_test,
            "tested": [vars(t) for t in self.tested],
        }


def learn_then_test(
    model,
    prompts,
    measure_name: str,
    criterion: str,
    target: float,
    confidence: float,
    max_new_tokens: int,
    exit_layers=None,
    kv: str = "recompute",
    progress: Optional[Callable[[str], None]] = None,
) -> GuaranteedThresholds:
    """Per-exit thresholds whose risk 1 - `criterion` is at most 1 - `target` with probability
    `confidence` (over prompts drawn like these). Half the prompts learn, half test."""
    from megatron.early_exit.inference.calibration import (
        as_exit_thresholds,
        exit_confidences,
        per_exit_thresholds,
        token_agreement,
        token_consistency,
    )
    from megatron.early_exit.inference.confidence import get_confidence_measure
    from megatron.early_exit.inference.generate import generate
    from megatron.early_exit.inference.strategies import EarlyExit, FullDepth

    if criterion not in ("consistency", "agreement"):
        raise ValueError(f"criterion must be consistency or agreement, got {criterion!r}")
    if len(prompts) < 4:
        raise ValueError(f"Learn-then-Test needs at least 4 prompts (half learn, half test), got {len(prompts)}")
    learn, test = prompts[: len(prompts) // 2], prompts[len(prompts) // 2 :]
    delta, epsilon = 1.0 - target, 1.0 - confidence
    full = [generate(model, [p], FullDepth(), max_new_tokens).tokens[0] for p in learn + test]
    confidences = exit_confidences(
        model,
        [list(p) + c for p, c in zip(learn, full[: len(learn)])],
        get_confidence_measure(measure_name, model),
        exit_layers,
        [len(p) - 1 for p in learn],
    )
    candidates, seen = [], set()
    for precision in PRECISIONS:
        thresholds = {
            n: t for n, t in as_exit_thresholds(per_exit_thresholds(confidences, precision)).items() if t <= 1
        }
        key = tuple(sorted(thresholds.items()))
        if thresholds and key not in seen:
            seen.add(key)
            candidates.append((precision, thresholds))
    references = full[len(learn) :]

    def p_value(candidate) -> TestedCandidate:
        precision, thresholds = candidate
        strategy = EarlyExit(2.0, measure_name, kv, exit_layers, thresholds)
        losses = []
        for prompt, reference in zip(test, references):
            tokens = generate(model, [prompt], strategy, max_new_tokens).tokens[0]
            score = (
                token_consistency(model, [prompt], [tokens])
                if criterion == "consistency"
                else token_agreement([reference], [tokens])
            )
            losses.append(1.0 - score)
        risk = sum(losses) / len(losses)
        result = TestedCandidate(
            f"precision {precision}", risk, hoeffding_bentkus_pvalue(risk, len(losses), delta), False
        )
        if progress:
            progress(
                f"{result.label}: thresholds {_rounded(thresholds)}: test risk {risk:.4f}, p-value {result.p_value:.4f}"
            )
        return result

    last, tested = fixed_sequence_test(candidates, p_value, epsilon)
    return GuaranteedThresholds(
        criterion,
        target,
        confidence,
        measure_name,
        candidates[last][1] if last >= 0 else {},
        len(learn),
        len(test),
        tested,
    )


def _rounded(thresholds: Dict[int, float]) -> Dict[int, float]:
    return {n: round(t, 4) for n, t in thresholds.items()}


def read_exit_thresholds(path: str) -> Dict[int, float]:
    """{exit: threshold} from a tools/calibrate_threshold.py JSON file (its `exit_thresholds`)."""
    return read_calibration(path)[0]


def read_calibration(path: str) -> Tuple[Dict[int, float], Optional[str]]:
    """({exit: threshold}, the confidence measure they were calibrated with, or None when the file
    does not say) from a tools/calibrate_threshold.py JSON file."""
    import json

    from megatron.early_exit.inference.errors import InferenceConfigError

    try:
        with open(path) as f:
            data = json.load(f)
        measure = data.get("measure")
        if "exit_thresholds" not in data and isinstance(data.get("chosen"), dict):  # a --per-exit sweep's choice
            data = data["chosen"]
        thresholds = {int(k): float(v) for k, v in data["exit_thresholds"].items()}
    except FileNotFoundError:
        raise InferenceConfigError(f"--exit-thresholds-file: no file {path}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InferenceConfigError(
            f"--exit-thresholds-file: {path} has no exit_thresholds {{exit: threshold}} ({e})"
        ) from None
    if measure is not None and not isinstance(measure, str):
        raise InferenceConfigError(f"--exit-thresholds-file: {path}: measure must be a name, got {measure!r}")
    return thresholds, measure
