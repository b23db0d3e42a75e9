"""Threshold sweeps: decoding speed against agreement with full-depth output.

Shared by benchmarks/inference_speed.py and tools/calibrate_threshold.py. Every strategy
decodes the same prompts one at a time (batch size 1, where early exit pays most) with
greedy sampling. Two measures of faithfulness to the full model:
  agreement    the tokens compared position by position with full-depth decoding: any
               difference counts, and after a divergence every later position counts too
  consistency  the fraction of generated tokens that the full model would have chosen
               after the same prefix (CALM's per-token consistency; no cascade)
Speed is decode tokens per second, from the best of `repeats` timings of each prompt,
which filters out a busy machine's noise. `oracle_decode` bounds what any confidence
measure can reach with a model's exits: it lets each token leave at the shallowest exit
whose token is the final layer's, at the cost of a real exit test.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from megatron.early_exit.inference.confidence import ExitView
from megatron.early_exit.inference.context import inference_context
from megatron.early_exit.inference.decoder import Decoder
from megatron.early_exit.inference.generate import generate
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
    drafts_per_round: Optional[float] = None  # self-speculative: drafted / verification passes

    def acceptance_for(self, speedup: float) -> Optional[float]:
        """Self-speculative: the acceptance that would give `speedup` at this run's cost per
        round (drafts and one verification), from tokens per round = 1 + acceptance * drafts."""
        if self.acceptance is None or not self.drafts_per_round:
            return None
        per_round = 1 + self.acceptance * self.drafts_per_round
        return (speedup / self.speedup * per_round - 1) / self.drafts_per_round

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


def time_strategies(
    model,
    prompts,
    strategies: Sequence,
    max_new_tokens: int,
    repeats: int = 1,
    stop_tokens=(),
    clock: str = "wall",
    progress: Optional[Callable[[str], None]] = None,
    names: Optional[Sequence[str]] = None,
) -> List[List[GenerationResult]]:
    """Each strategy's fastest run of each prompt, [strategy][prompt]. The strategies take
    turns within every repeat, so a busy spell of the machine slows all of them alike.
    `names` label the progress lines (default: each strategy's name)."""
    names = list(names) if names is not None else [s.name for s in strategies]
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
                progress(f"repeat {rep + 1}/{repeats}  {names[i]:<28} {tps:8.1f} tokens/s so far")
    return best


def sweep(
    model,
    prompts,
    strategies: Sequence,
    max_new_tokens: int = 64,
    repeats: int = 1,
    stop_tokens=(),
    clock: str = "wall",
    progress: Optional[Callable[[str], None]] = None,
) -> List[SweepPoint]:
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
        rounds = sum(r.num_decoded - r.num_accepted for r in results)  # each round adds accepted + 1
        points.append(
            SweepPoint(
                strategy.name,
                None if getattr(strategy, "exit_thresholds", None) else getattr(strategy, "threshold", None),
                tps,
                tps / points[0].tokens_per_second if points else 1.0,
                token_agreement(reference, tokens),
                token_consistency(model, prompts, tokens),
                sum(depths) / len(depths) if depths else float(num_layers),
                num_layers,
                sum(r.num_accepted for r in results) / drafted if drafted else None,
                drafted / rounds if drafted and rounds else None,
            )
        )
    return points


def pick_fastest(candidates: Sequence, min_agreement: float, criterion: str = "agreement", point=lambda c: c):
    """The fastest candidate whose agreement (or consistency) is at least `min_agreement`;
    candidates are SweepPoints, or anything `point` maps to its SweepPoint."""
    ok = [c for c in candidates if getattr(point(c), criterion) >= min_agreement]
    return max(ok, key=lambda c: point(c).tokens_per_second) if ok else None


def header(width: int = 28) -> str:
    return (
        f"{'strategy':<{width}}{'threshold':>10}{'tokens/s':>10}{'speedup':>9}{'agreement':>11}{'consistency':>13}"
        f"{'mean exit':>11}{'ideal':>7}{'achieved/ideal':>16}{'accepted':>10}"
    )


def format_row(p: SweepPoint, width: int = 28) -> str:
    def opt(value, fmt):
        return format(value, fmt) if value is not None else "-"

    return (
        f"{p.strategy:<{width}}{opt(p.threshold, '.3g'):>10}{p.tokens_per_second:>10.1f}{p.speedup:>8.2f}x"
        f"{p.agreement:>11.3f}{p.consistency:>13.3f}{p.mean_exit_layer:>11.2f}{opt(p.ideal_speedup, '.2f'):>7}"
        f"{opt(p.efficiency, '.2f'):>16}{opt(p.acceptance, '.2f'):>10}"
    )


def format_table(points: Sequence[SweepPoint]) -> str:
    width = max([28] + [len(p.strategy) + 1 for p in points])
    return "\n".join([header(width), *(format_row(p, width) for p in points)])


# -- thresholds per exit ----------------------------------------------------------------


@dataclass
class ExitCalibration:
    """One exit's threshold for a target: the lowest confidence at which the tokens that would
    fire there (among those no shallower exit took) agree with the final layer at >= target."""

    layer_number: int
    threshold: float  # inf: no threshold reaches the target; the exit never fires
    precision: float  # agreement with the final layer of the tokens that fire
    coverage: float  # fraction of all tokens that leave here


def exit_confidences(model, sequences: Sequence[Sequence[int]], measure, exit_layers=None, starts=None):
    """(confidence [n], agrees with the final layer's token [n]) of each exit, at each position
    of `sequences` from `starts[i]` on (the positions that predict a generated token), from one
    full-depth pass over each sequence through the decoder."""
    import torch

    from megatron.early_exit.inference.layers import exit_logits

    parts: dict = {}
    with inference_context(model):
        for i, seq in enumerate(sequences):
            decoder = Decoder(model, 1, len(seq))
            points = {p.depth: p for n, p in decoder.exit_points.items() if exit_layers is None or n in exit_layers}
            seen, previous = {}, {}

            def observe(depth, x, attention_output):
                previous[depth] = x[:, 0]
                point = points.get(depth)
                if point is None:
                    return
                head_input = attention_output if point.head.has_mlp else None
                logits = exit_logits(model, point.head, point.layer, x, head_input)[:, 0]
                view = ExitView(
                    point.layer_number,
                    x[:, 0],
                    previous.get(depth - 1),
                    lambda rows: logits if rows is None else logits.index_select(0, rows),
                    _logits=logits.float(),
                )
                confidence = measure(view)
                seen[point.layer_number] = (confidence.float(), logits.argmax(-1))

            final = decoder.step([0], [list(seq)], all_logits=True, observe=observe).chunk_logits[0].argmax(-1)
            start = starts[i] if starts is not None else 0
            for n, (confidence, token) in seen.items():
                parts.setdefault(n, []).append((confidence[start:], (token == final)[start:]))
    return {n: (torch.cat([c for c, _ in p]), torch.cat([a for _, a in p])) for n, p in sorted(parts.items())}


def per_exit_thresholds(confidences, target: float) -> List[ExitCalibration]:
    """Shallowest exit first: among the tokens still going, the most confident ones that agree
    with the final layer at >= `target` fire, and the rest go on to the next exit."""
    import torch

    total = next(iter(confidences.values()))[0].numel() if confidences else 0
    going = None
    result = []
    for n, (confidence, agree) in confidences.items():
        going = torch.ones_like(agree) if going is None else going
        conf, ok = confidence[going], agree[going].float()
        order = torch.argsort(conf, descending=True)
        precision = torch.cumsum(ok[order], 0) / torch.arange(1, len(order) + 1)
        reached = (precision >= target).nonzero()
        if len(reached) == 0:
            result.append(ExitCalibration(n, math.inf, 0.0, 0.0))
            continue
        k = int(reached[-1]) + 1
        threshold = float(conf[order[k - 1]])
        fires = going & (confidence >= threshold)
        result.append(ExitCalibration(n, threshold, float(agree[fires].float().mean()), float(fires.sum()) / total))
        going = going & ~fires
    return result


def calibrate_per_exit(
    model,
    prompts,
    measure_name: str,
    targets: Sequence[float],
    max_new_tokens: int,
    exit_layers=None,
    continuations: Optional[Sequence[Sequence[int]]] = None,
) -> dict:
    """{target: [ExitCalibration per exit]} from the full-depth greedy continuations of `prompts`
    (one decode and one full-depth pass per prompt, whatever the number of targets; no decode
    when the caller passes the `continuations` it already has)."""
    from megatron.early_exit.inference.confidence import get_confidence_measure

    if continuations is None:
        continuations = [generate(model, [p], FullDepth(), max_new_tokens).tokens[0] for p in prompts]
    confidences = exit_confidences(
        model,
        [list(p) + c for p, c in zip(prompts, continuations)],
        get_confidence_measure(measure_name, model),
        exit_layers,
        [len(p) - 1 for p in prompts],
    )
    return {target: per_exit_thresholds(confidences, target) for target in targets}


def as_exit_thresholds(calibrated: Sequence[ExitCalibration]) -> dict:
    """{exit: threshold} for EarlyExit(exit_thresholds=...): an exit no threshold suits gets 2 (never)."""
    return {c.layer_number: c.threshold if math.isfinite(c.threshold) else 2.0 for c in calibrated}


# -- the bound of a confidence measure ---------------------------------------------------


@dataclass
class OracleRun:
    """Decoding with an exit test that knows the final layer's token (see `oracle_decode`)."""

    tokens: List[List[int]]  # per prompt: equal to full-depth greedy decoding
    reference: List[List[int]]  # per prompt: the full-depth greedy continuation it replays
    depths: List[List[int]]  # per prompt, per decoded token: the layer it left at
    seconds: float  # decoding, best of the repeats summed over prompts
    full_seconds: float  # the same loop at full depth, timed alongside
    coverage: dict  # {exit: fraction of decoded tokens leaving there}

    @property
    def speedup(self) -> float:
        return self.full_seconds / self.seconds

    @property
    def equals_full_depth(self) -> bool:
        return self.tokens == self.reference

    @property
    def mean_exit_layer(self) -> float:
        depths = [d for per_prompt in self.depths for d in per_prompt]
        return sum(depths) / len(depths)


def oracle_decode(
    model,
    prompts,
    exit_layers,
    max_new_tokens: int,
    measure_name: str = "max_prob",
    repeats: int = 1,
    clock: str = "wall",
) -> OracleRun:
    """What any confidence measure can reach with these exits at their cost: each token
    leaves at the shallowest active exit whose token is the final layer's after the same
    prefix (known from a full-depth pass over the full-depth continuation), so the output
    equals full depth. The shallower exits are still tested (`measure_name`, never firing),
    so a step costs what a real measure's step costs; the one that fires takes its token from
    its head without a test (a gate could veto it).
    Greedy, batch 1, each step's token read from the device once (as `generate` does)."""
    from megatron.early_exit.inference.confidence import get_confidence_measure
    from megatron.early_exit.inference.decoder import FULL_DEPTH, ExitPolicy

    measure = get_confidence_measure(measure_name, model)
    continuations = [generate(model, [p], FullDepth(), max_new_tokens).tokens[0] for p in prompts]
    agrees = exit_confidences(
        model,
        [list(p) + c for p, c in zip(prompts, continuations)],
        measure,
        exit_layers,
        [len(p) - 1 for p in prompts],
    )
    exits = sorted(agrees)  # --exit-layer-nums entries, shallowest first
    offsets = [0]
    for c in continuations:
        offsets.append(offsets[-1] + len(c) + 1)  # positions from the prompt's last token on

    tokens, depths = [], []
    seconds = full_seconds = 0.0
    timer = time.perf_counter if clock == "wall" else time.process_time
    with inference_context(model):
        decoder = Decoder(model, 1, 1)  # for the exit points only
        points = {n: decoder.exit_points[n] for n in exits}
        # A policy per exit that fires: the exits before it tested above any confidence.
        policies = {
            n: ExitPolicy(
                {points[m].depth: points[m] for m in exits[: i + 1]},
                2.0,
                measure,
                per_exit={points[n].depth: -math.inf},
            )
            for i, n in enumerate(exits)
        }
        policies[None] = ExitPolicy({points[m].depth: points[m] for m in exits}, 2.0, measure)

        def run(prompt, continuation, leave):
            decoder = Decoder(model, 1, len(prompt) + max_new_tokens)
            out = decoder.step([0], [list(prompt)])
            token = int(out.logits[0].argmax())
            produced, layers = [token], []
            start = timer()
            for j in range(1, len(continuation)):
                out = decoder.step([0], [[token]], FULL_DEPTH if leave is None else policies[leave[j]])
                token = int(out.logits[0].argmax())
                produced.append(token)
                layers.append(out.depths[0])
            return timer() - start, produced, layers

        for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
            span = slice(offsets[i], offsets[i + 1] - 1)
            agree = {n: agrees[n][1][span].tolist() for n in exits}
            leave = [next((n for n in exits if agree[n][j]), None) for j in range(len(continuation))]
            best = best_full = math.inf
            for _ in range(repeats):
                took, produced, layers = run(prompt, continuation, leave)
                best = min(best, took)
                best_full = min(best_full, run(prompt, continuation, None)[0])
            tokens.append(produced)
            depths.append(layers)
            seconds += best
            full_seconds += best_full
    decided = [d for per_prompt in depths for d in per_prompt]
    coverage = {n: sum(d == points[n].depth for d in decided) / len(decided) for n in exits} if decided else {}
    return OracleRun(tokens, continuations, depths, seconds, full_seconds, coverage)
