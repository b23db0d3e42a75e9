"""Engine jobs: what rank 0 broadcasts and every rank runs, and how requests become jobs.

A Job is one `generate` call: token ids, a strategy, sampling parameters, a budget and stop
tokens. Rank 0 builds it from a validated request and checks it against the loaded model
(exit layers, context length, prompt size) before anything is broadcast, so a bad request
is answered with a 400 naming its field and the other ranks never see it. Every value a
rank could choose differently is fixed here: an unseeded sampling request gets a seed
drawn on rank 0, so all tensor-parallel ranks draw the same tokens.

A ScoreJob scores token sequences (prompt log-probabilities) under the final layer or one
exit, with top-N alternatives, in one forward pass.

Greedy jobs with the same strategy, budget and stop tokens can share one engine call, and
so can score jobs with the same exit (`batch_key`, `merge_jobs`, `split_result`); each row
decides its exits for itself. A job's `listener` (rank 0 only, never broadcast) hears its
rows' tokens as they are decoded.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from megatron.early_exit.inference import (
    EarlyExit,
    FullDepth,
    GenerationResult,
    InferenceConfigError,
    SamplingParams,
    SelfSpeculative,
    generate,
)
from megatron.early_exit.inference.confidence import PLAIN_MEASURES
from megatron.early_exit.inference.exit_numbers import number_event, number_result
from megatron.early_exit.inference.prompts import PromptError
from megatron.early_exit.inference.prompts import check_prompts as check_engine_prompts
from megatron.early_exit.inference.result import TokenEvent
from megatron.early_exit.inference.scoring import ScoreResult, score
from megatron.early_exit.server.schemas import DEFAULT_EARLY_EXIT_THRESHOLD, EarlyExitOptions


class RequestError(ValueError):
    """A request the loaded model cannot serve; `param` names the offending field."""

    def __init__(self, param: Optional[str], message: str):
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param


Listener = Callable[[TokenEvent], None]


@dataclass(frozen=True)
class Job:
    prompts: Tuple[Tuple[int, ...], ...]
    strategy: object  # FullDepth, EarlyExit or SelfSpeculative
    sampling: SamplingParams
    max_new_tokens: int
    stop_tokens: Tuple[int, ...] = ()
    top_n: int = 0  # alternatives kept per generated token
    # Rank 0 only (dropped before the broadcast): hears this job's rows as they are decoded.
    listener: Optional[Listener] = field(default=None, compare=False, repr=False)
    # Rank 0 only: set when the request's client went away; its rows stop at the next step.
    cancel: Optional[threading.Event] = field(default=None, compare=False, repr=False)

    @property
    def batch_key(self):
        """Jobs with equal keys may run as one engine call (greedy ones only: a sampled
        job's tokens depend on its own generator)."""
        if not self.sampling.greedy:
            return None
        return ("generate", self.strategy, self.max_new_tokens, self.stop_tokens, self.sampling.ban_after)

    @property
    def rows(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class ScoreJob:
    """Log-probabilities of each sequence's tokens after the first (prompt scoring)."""

    prompts: Tuple[Tuple[int, ...], ...]
    exit_layer: Optional[int] = None  # None: the final layer
    top_n: int = 0
    listener: None = field(default=None, compare=False, repr=False)
    cancel: None = field(default=None, compare=False, repr=False)

    @property
    def batch_key(self):
        return ("score", self.exit_layer)

    @property
    def rows(self) -> int:
        return len(self.prompts)


AnyJob = Union[Job, ScoreJob]


def run_job(
    model,
    job: AnyJob,
    on_tokens: Optional[Listener] = None,
    cancelled: Optional[Callable[[], Sequence[int]]] = None,
    between_rounds: Optional[Callable[[], None]] = None,
) -> Union[GenerationResult, ScoreResult]:
    """The engine call, identical on every rank (`on_tokens` only where tokens are picked;
    `cancelled` gives every rank rank 0's rows to stop; `between_rounds` runs between two
    self-speculative rounds, alike on every rank). Exits come out as the numbers requests
    use (--exit-layer-nums entries), not depths."""
    if isinstance(job, ScoreJob):
        return score(model, [list(p) for p in job.prompts], job.exit_layer, job.top_n)
    listener = None if on_tokens is None else (lambda event: on_tokens(number_event(model, event)))
    return number_result(
        model,
        generate(
            model,
            [list(p) for p in job.prompts],
            job.strategy,
            job.max_new_tokens,
            job.sampling,
            job.stop_tokens,
            top_n=job.top_n,
            on_tokens=listener,
            cancelled=cancelled,
            between_rounds=between_rounds,
        ),
    )


def merge_jobs(jobs: Sequence[AnyJob]) -> AnyJob:
    """One job for the batch (the largest top_n of its jobs), without listeners."""
    if len(jobs) == 1:
        return dataclasses.replace(jobs[0], listener=None, cancel=None)
    return dataclasses.replace(
        jobs[0],
        prompts=tuple(p for job in jobs for p in job.prompts),
        top_n=max(job.top_n for job in jobs),
        listener=None,
        cancel=None,
    )


def cancelled_rows(jobs: Sequence[AnyJob]) -> Optional[Callable[[], List[int]]]:
    """The merged job's rows whose request was cancelled (None: no job can be)."""
    if not any(job.cancel is not None for job in jobs):
        return None
    spans, start = [], 0
    for job in jobs:
        spans.append((job.cancel, range(start, start + job.rows)))
        start += job.rows
    return lambda: [r for cancel, rows in spans if cancel is not None and cancel.is_set() for r in rows]


def route_tokens(jobs: Sequence[AnyJob]) -> Optional[Listener]:
    """The merged job's callback: each event goes to the listener of the job owning the row,
    with the row and the alternatives renumbered and cut to that job's own."""
    if not any(job.listener for job in jobs):
        return None
    owners, start = [], 0
    for job in jobs:
        owners += [(job, start)] * job.rows
        start += job.rows

    def route(event: TokenEvent) -> None:
        job, first = owners[event.row]
        if job.listener is not None:
            try:
                job.listener(_cut_event(event, event.row - first, job.top_n))
            except RuntimeError:  # its reply's event loop is gone: the other rows go on
                pass

    return route


def _cut_event(event: TokenEvent, row: int, top_n: int) -> TokenEvent:
    top = (
        (None, None)
        if not top_n or event.top_tokens is None
        else ([t[:top_n] for t in event.top_tokens], [v[:top_n] for v in event.top_logprobs])
    )
    return dataclasses.replace(event, row=row, top_tokens=top[0], top_logprobs=top[1])


def split_result(result, jobs: Sequence[AnyJob]) -> list:
    """One result per merged job, with its rows (timings and counters are the batch's)."""
    if len(jobs) == 1:
        return [result]
    parts, start = [], 0
    for job in jobs:
        end = start + job.rows
        if isinstance(result, ScoreResult):
            parts.append(
                dataclasses.replace(
                    result,
                    logprobs=result.logprobs[start:end],
                    greedy=result.greedy[start:end],
                    top_tokens=[[t[: job.top_n] for t in row] for row in result.top_tokens[start:end]],
                    top_logprobs=[[v[: job.top_n] for v in row] for row in result.top_logprobs[start:end]],
                )
            )
        else:
            top = (
                {}
                if result.top_tokens is None
                else dict(
                    top_tokens=[[t[: job.top_n] for t in row] for row in result.top_tokens[start:end]]
                    if job.top_n
                    else None,
                    top_logprobs=[[v[: job.top_n] for v in row] for row in result.top_logprobs[start:end]]
                    if job.top_n
                    else None,
                )
            )
            parts.append(
                dataclasses.replace(
                    result,
                    tokens=result.tokens[start:end],
                    exit_layers=result.exit_layers[start:end],
                    logprobs=result.logprobs[start:end],
                    **top,
                )
            )
        start = end
    return parts


# -- requests -> jobs (rank 0) ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLimits:
    """What rank 0 checks requests against: the loaded model and the server's limits."""

    name: str
    vocab_size: int  # the model's (padded) vocabulary
    num_layers: int
    exit_layer_nums: Tuple[int, ...]
    max_sequence_length: int
    max_batch_size: int  # prompts per request (and per merged engine call)
    max_prompt_tokens: int
    pipeline_stages: int = 1  # the server's --pipeline-model-parallel-size
    exit_thresholds: Optional[Dict[int, float]] = None  # --exit-thresholds-file: used when a request sets none
    exit_thresholds_measure: Optional[str] = None  # the confidence measure they were calibrated with
    # The confidence measures requests may name: those that need a classifier (learned,
    # gated_max_prob) only with --confidence-estimator.
    confidence_measures: Tuple[str, ...] = PLAIN_MEASURES


def scoring_exit(options: EarlyExitOptions, limits: ModelLimits) -> Optional[int]:
    """The exit that scores and generates for `exit_layer` (None: the final layer)."""
    layer = options.exit_layer
    if layer is None or layer == limits.num_layers:
        return None
    if layer not in limits.exit_layer_nums:
        raise RequestError(
            "exit_layer",
            f"{layer} is not an exit of this model (its exits: "
            f"{list(limits.exit_layer_nums)}; {limits.num_layers}: the final layer)",
        )
    return layer


def build_strategy(options: EarlyExitOptions, limits: ModelLimits, greedy: bool):
    # Fields the chosen decoding would not read are refused, not silently ignored.
    if options.exit_layer is not None and (options.speculative is not None or options.use_early_exit):
        raise RequestError("exit_layer", "fixes the exit: it excludes use_early_exit and speculative")
    exit_layer = scoring_exit(options, limits)
    if exit_layer is not None:  # threshold 0 at that exit alone: every decoded token leaves there
        return _engine_call("exit_layer", lambda: EarlyExit(0.0, kv=options.kv_strategy, exit_layers=(exit_layer,)))
    if options.exit_thresholds and not options.use_early_exit:
        raise RequestError(
            "exit_thresholds", "only apply with use_early_exit true: set use_early_exit true or drop exit_thresholds"
        )
    if options.exit_layers and not options.use_early_exit:
        raise RequestError(
            "exit_layers",
            "only apply with use_early_exit true (here every token goes through the "
            "full depth): set use_early_exit true or drop exit_layers",
        )
    if options.kv_strategy == "pipeline" and limits.pipeline_stages == 1:
        raise RequestError(
            "kv_strategy",
            "'pipeline' needs a server launched with --pipeline-model-parallel-size > 1 "
            "(this one runs one stage): use 'recompute' or 'propagate'",
        )
    if options.speculative is not None:
        spec = options.speculative
        # Sampled too: rejection sampling keeps the full model's distribution (speculative.py).
        _check_exits("speculative.exit_layer", [spec.exit_layer], limits)
        return _engine_call(
            "speculative", lambda: SelfSpeculative(spec.exit_layer, spec.num_draft, spec.draft_threshold)
        )
    if not options.use_early_exit:
        return FullDepth()
    if not limits.exit_layer_nums:
        raise RequestError("use_early_exit", "this model has no exits (it was trained without --exit-layer-nums)")
    layers = tuple(options.exit_layers) if options.exit_layers else None
    if layers:
        _check_exits("exit_layers", layers, limits)
    threshold = DEFAULT_EARLY_EXIT_THRESHOLD if options.early_exit_thres is None else options.early_exit_thres
    if options.confidence not in limits.confidence_measures:
        raise RequestError(
            "confidence",
            f"{options.confidence!r} needs a confidence estimator this server was not started with "
            f"(--confidence-estimator FILE, from tools/train_confidence_estimator.py); it serves "
            f"{', '.join(limits.confidence_measures)}",
        )
    if not options.exit_thresholds and options.early_exit_thres is None and limits.exit_thresholds is not None:
        # The calibrated thresholds, with the measure they were calibrated for (a threshold means
        # nothing under another); an exit they leave out never fires.
        measure = limits.exit_thresholds_measure or options.confidence
        if "confidence" in options.model_fields_set and options.confidence != measure:
            raise RequestError(
                "confidence",
                f"the server's calibrated thresholds (--exit-thresholds-file) are for measure {measure!r}: drop "
                f"confidence, or send early_exit_thres or exit_thresholds of your own for {options.confidence!r}",
            )
        return _engine_call(
            "exit_thresholds",
            lambda: EarlyExit(2.0, measure, options.kv_strategy, layers, limits.exit_thresholds),
        )
    if options.exit_thresholds:
        _check_exits("exit_thresholds", sorted(options.exit_thresholds), limits)
    return _engine_call(
        "early_exit_thres",
        lambda: EarlyExit(threshold, options.confidence, options.kv_strategy, layers, options.exit_thresholds),
    )


def build_sampling(temperature: float, top_k: int, top_p: float, seed: Optional[int]) -> SamplingParams:
    if seed is None:  # drawn here so that every rank samples with the same generator
        seed = random.SystemRandom().randrange(2**62)
    return _engine_call("temperature", lambda: SamplingParams(temperature, top_k, top_p, seed))


def check_prompts(
    prompts: List[List[int]], max_new_tokens: int, limits: ModelLimits, prompt_field: str, budget_field: str
) -> None:
    """The server's own limits (prompts per request, tokens per prompt), then the engine's
    rules (prompts.check_prompts) under the request's field names."""
    if len(prompts) > limits.max_batch_size:
        raise RequestError(
            prompt_field, f"{len(prompts)} prompts exceed the server's --max-batch-size {limits.max_batch_size}"
        )
    for i, p in enumerate(prompts):
        if len(p) > limits.max_prompt_tokens:
            raise RequestError(
                f"{prompt_field}[{i}]",
                f"prompt of {len(p)} tokens exceeds the server's limit of {limits.max_prompt_tokens} tokens",
            )
    try:
        check_engine_prompts(
            prompts,
            max_new_tokens,
            limits.vocab_size,
            limits.max_sequence_length,
            prompt_field,
            budget_field,
            min_new_tokens=0,
        )
    except PromptError as err:
        raise RequestError(err.field, err.message) from None


def _check_exits(field: str, layers: Sequence[int], limits: ModelLimits) -> None:
    unknown = [n for n in layers if n not in limits.exit_layer_nums]
    if unknown:
        raise RequestError(field, f"{unknown} not an exit of this model (its exits: {list(limits.exit_layer_nums)})")


def _engine_call(param: str, build):
    try:
        return build()
    except InferenceConfigError as err:
        raise RequestError(param, str(err)) from None
