"""Threshold sweeps: decoding speed against agreement with full-depth output.

Shared by benchmarks/inference_speed.py and tools/calibrate_threshold.py. Every strategy
decodes the same prompts one at a time (batch size 1, where early exit pays most) with
greedy sampling. Two measures of faithfulness to the full model:
  agreement    the tokens compared position by position with full-depth decoding: any
               difference counts, and after a divergence every later position counts too
  consistency  the fraction of generated tokens that the full model would have chosen
               after the same prefix (CALM's per-token consistency; no cascade)
Speed is decode tokens per second, from the best of `repeats` timings of each prompt,
which filters out a busy machine's noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from megatron.early_exit.inference.decoder import Decoder
from megatron.early_exit.inference.generate import generate, inference_context
from megatron.early_exit.inference.result import GenerationResult
from megatron.early_exit.inference.strategies import FullDepth


@dataclass
class SweepPoint:
    strategy: str
    threshold: Optional[float]
    tokens_per_second: float
    speedup: float  # over full-depth decoding
    agreement: float  # fraction of positions with the full-depth token
    consistency: float  # fraction of tokens the full model would choose after the same prefix
    mean_exit_layer: float
    num_layers: int
    acceptance: Optional[float] = None  # self-speculative: accepted / drafted

    @property
    def ideal_speedup(self) -> Optional[float]:
        """num_layers / mean layers per token: what skipping layers alone would give."""
        if self.acceptance is not None:
            return None
        return self.num_layers / self.mean_exit_layer

    @property
    def efficiency(self) -> Optional[float]:
        ideal = self.ideal_speedup
        return self.speedup / ideal if ideal else None


def token_agreement(reference: Sequence[Sequence[int]], tokens: Sequence[Sequence[int]]) -> float:
    """Fraction of the reference's positions where `tokens` holds the same token."""
    total = sum(len(r) for r in reference)
    same = sum(a == b for ref, out in zip(reference, tokens) for a, b in zip(ref, out))
    return same / total if total else 1.0


def token_consistency(model, prompts, tokens) -> float:
    """Fraction of `tokens` equal to the full model's greedy choice after the same prefix
    (one full-depth pass over each prompt + continuation)."""
    same = total = 0
    for prompt, generated in zip(prompts, tokens):
        if not generated:
            continue
        sequence = list(prompt) + list(generated)
        with inference_context(model):
            logits = Decoder(model, 1, len(sequence)).step([0], [sequence], all_logits=True).chunk_logits[0]
        choices = logits[len(prompt) - 1 : -1].argmax(dim=-1).tolist()
        same += sum(a == b for a, b in zip(choices, generated))
        total += len(generated)
    return same / total if total else 1.0


def time_strategies(model, prompts, strategies: Sequence, max_new_tokens: int, repeats: int = 1, stop_tokens=(),
                    clock: str = "wall", progress: Optional[Callable[[str], None]] = None) -> List[List[GenerationResult]]:
    """Each strategy's fastest run of each prompt, [strategy][prompt]. The strategies take
    turns within every repeat, so a busy spell of the machine slows all of them alike."""
    seconds = (lambda r: r.decode_seconds) if clock == "wall" else (lambda r: r.decode_cpu_seconds)
    best: List[List[Optional[GenerationResult]]] = [[None] * len(prompts) for _ in strategies]
    for strategy in strategies:  # warm-up: the first calls of each code path
        generate(model, [prompts[0]], strategy, min(4, max_new_tokens))
    for rep in range(repeats):
        for i, strategy in enumerate(strategies):
            for j, prompt in enumerate(prompts):
                result = generate(model, [prompt], strategy, max_new_tokens, stop_tokens=stop_tokens)
                if best[i][j] is None or seconds(result) < seconds(best[i][j]):
                    best[i][j] = result
            if progress:
                tps = sum(r.num_decoded for r in best[i]) / sum(seconds(r) for r in best[i])
                progress(f"repeat {rep + 1}/{repeats}  {strategy.name:<28} {tps:8.1f} tokens/s so far")
    return best


def sweep(model, prompts, strategies: Sequence, max_new_tokens: int = 64, repeats: int = 1, stop_tokens=(),
          clock: str = "wall", progress: Optional[Callable[[str], None]] = None) -> List[SweepPoint]:
    """Full depth (the reference) and every strategy; one SweepPoint each, full depth first.

    clock "wall" times decoding as a user waits for it; "cpu" counts this process's CPU
    time only, which a machine shared with other jobs disturbs less (use one thread)."""
    strategies = [FullDepth(), *strategies]
    runs = time_strategies(model, prompts, strategies, max_new_tokens, repeats, stop_tokens, clock, progress)
    num_layers = model.config.num_layers
    reference = [r.tokens[0] for r in runs[0]]
    points = []
    for strategy, results in zip(strategies, runs):
        seconds = sum(r.decode_seconds if clock == "wall" else r.decode_cpu_seconds for r in results)
        tps = sum(r.num_decoded for r in results) / seconds if seconds else 0.0
        tokens = [r.tokens[0] for r in results]
        depths = [d for r in results for d in r.exit_layers[0][1:]]
        drafted = sum(r.num_drafted for r in results)
        points.append(SweepPoint(
            strategy.name, getattr(strategy, "threshold", None), tps, tps / points[0].tokens_per_second if points else 1.0,
            token_agreement(reference, tokens), token_consistency(model, prompts, tokens),
            sum(depths) / len(depths) if depths else float(num_layers), num_layers,
            sum(r.num_accepted for r in results) / drafted if drafted else None,
        ))
    return points


def pick_fastest(points: Sequence[SweepPoint], min_agreement: float, criterion: str = "agreement") -> Optional[SweepPoint]:
    """The fastest point whose agreement (or consistency) is at least `min_agreement`."""
    ok = [p for p in points if getattr(p, criterion) >= min_agreement]
    return max(ok, key=lambda p: p.tokens_per_second) if ok else None


HEADER = (f"{'strategy':<28}{'threshold':>10}{'tokens/s':>10}{'speedup':>9}{'agreement':>11}{'consistency':>13}"
          f"{'mean exit':>11}{'ideal':>7}{'achieved/ideal':>16}{'accepted':>10}")


def format_row(p: SweepPoint) -> str:
    def opt(value, fmt):
        return format(value, fmt) if value is not None else "-"

    return (f"{p.strategy:<28}{opt(p.threshold, '.3g'):>10}{p.tokens_per_second:>10.1f}{p.speedup:>8.2f}x"
            f"{p.agreement:>11.3f}{p.consistency:>13.3f}{p.mean_exit_layer:>11.2f}{opt(p.ideal_speedup, '.2f'):>7}"
            f"{opt(p.efficiency, '.2f'):>16}{opt(p.acceptance, '.2f'):>10}")


def format_table(points: Sequence[SweepPoint]) -> str:
    return "\n".join([HEADER, *(format_row(p) for p in points)])
