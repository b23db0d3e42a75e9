"""generate(): prompts in, a GenerationResult out, for every strategy.

    prefill            every prompt at full depth in one batched pass; its first token
    decode_one_token   one batched step: each active row feeds its newest token
    decode_tokens      steps until every row hit its budget or a stop token
    speculative_decode (speculative.py) draft and verify rounds instead
    pipeline_generate  (pipeline.py) a model split into pipeline stages, or kv="pipeline":
                       every stage runs its layers for every row, exits decide
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from megatron.early_exit.inference.confidence import get_confidence_measure
from megatron.early_exit.inference.decoder import Decoder, ExitPolicy
from megatron.early_exit.inference.errors import InferenceConfigError
from megatron.early_exit.inference.context import inference_context
from megatron.early_exit.inference.pipeline import check_pipeline_strategy, pipeline_generate
from megatron.early_exit.inference.result import GenerationResult, TokenCallback, Transcript, clock
from megatron.early_exit.inference.sampling import SamplingParams
from megatron.early_exit.inference.speculative import speculative_decode
from megatron.early_exit.inference.strategies import EarlyExit, FullDepth, SelfSpeculative


def prefill(decoder: Decoder, transcript: Transcript, prompts: List[List[int]]) -> None:
    transcript.take(decoder.step(list(range(len(prompts))), prompts))


def decode_one_token(decoder: Decoder, transcript: Transcript, policy: ExitPolicy) -> None:
    rows = list(transcript.active)
    transcript.take(decoder.step(rows, [[transcript.last_token(r)] for r in rows], policy))
    transcript.result.num_steps += 1


def decode_tokens(decoder: Decoder, transcript: Transcript, policy: ExitPolicy) -> None:
    while transcript.going():
        decode_one_token(decoder, transcript, policy)


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    strategy=FullDepth(),
    max_new_tokens: int = 32,
    sampling: SamplingParams = SamplingParams(),
    stop_tokens: Iterable[int] = (),
    top_n: int = 0,
    on_tokens: Optional[TokenCallback] = None,
    cancelled: Optional[Callable[[], Iterable[int]]] = None,
) -> GenerationResult:
    """Continue each prompt (a list of token ids; lengths may differ) by up to
    `max_new_tokens` tokens, stopping a row early at any of `stop_tokens`.

    top_n > 0 keeps each token's top_n likeliest alternatives (result.top_tokens and
    top_logprobs); `on_tokens` is called with a TokenEvent each time a row's tokens are
    appended, while decoding goes on (on the rank that picks the tokens: the first stage).
    `cancelled()`, asked before each step on one stage, names rows to stop now (their
    callers went away); every tensor-parallel rank must get the same answer."""
    prompts = validate_prompts(model, prompts, max_new_tokens)
    if isinstance(strategy, SelfSpeculative) and sampling.ban_after:
        raise InferenceConfigError("self-speculative decoding verifies the full model's tokens: "
                                   "it takes no banned tokens (ban_after)")
    if not 0 <= top_n <= model.vocab_size:
        raise InferenceConfigError(f"top_n must be in [0, {model.vocab_size}], got {top_n}")
    if not (model.pre_process and model.post_process) or getattr(strategy, "kv", None) == "pipeline":
        return _generate_over_stages(model, prompts, strategy, max_new_tokens, sampling, stop_tokens, top_n, on_tokens)
    result = GenerationResult([[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts],
                              num_layers=model.config.num_layers, strategy=strategy.name)
    with inference_context(model):
        decoder = Decoder(model, len(prompts), max(len(p) for p in prompts) + max_new_tokens)
        policy = None if isinstance(strategy, SelfSpeculative) else strategy.exit_policy(decoder)
        transcript = Transcript(result, max_new_tokens, frozenset(int(t) for t in stop_tokens), sampling,
                                sampling.make_generator(decoder.device), active=list(range(len(prompts))),
                                top_n=top_n, on_tokens=on_tokens, previous=[p[-1] for p in prompts],
                                cancelled=cancelled)
        start = clock(decoder.device)
        prefill(decoder, transcript, prompts)
        result.prefill_seconds = clock(decoder.device) - start
        cpu_start = time.process_time()
        if isinstance(strategy, SelfSpeculative):
            speculative_decode(decoder, transcript, strategy)
        else:
            decode_tokens(decoder, transcript, policy)
        result.decode_seconds = clock(decoder.device) - start - result.prefill_seconds
        result.decode_cpu_seconds = time.process_time() - cpu_start
    return result


def _generate_over_stages(model, prompts, strategy, max_new_tokens, sampling, stop_tokens, top_n=0,
                          on_tokens=None) -> GenerationResult:
    """Pipeline-based early exit (pipeline.py); FullDepth runs there as threshold infinity."""
    check_pipeline_strategy(model, strategy)
    if isinstance(strategy, EarlyExit) and not model.ee_config.exit_layer_nums:
        raise InferenceConfigError("early exit needs a model with exits (--exit-layer-nums)")
    firing = strategy.firing_exits(model.ee_config.exit_layer_nums) if isinstance(strategy, EarlyExit) else []
    early = bool(firing)
    with inference_context(model):
        return pipeline_generate(
            model, prompts, max_new_tokens, sampling, stop_tokens, strategy.name,
            exit_layers=firing if early else None,
            threshold=float(strategy.threshold) if early else math.inf,
            measure=get_confidence_measure(strategy.measure, model) if early else None,
            top_n=top_n, on_tokens=on_tokens,
            exit_thresholds={n: strategy.threshold_of(n) for n in firing} if early else None,
        )


def validate_prompts(model, prompts, max_new_tokens: int) -> List[List[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        raise InferenceConfigError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise InferenceConfigError(f"empty prompt at index {[i for i, p in enumerate(prompts) if not p]}: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise InferenceConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = model.vocab_size
    bad = sorted({t for p in prompts for t in p if not 0 <= t < vocab})
    if bad:
        raise InferenceConfigError(f"prompt token ids {bad[:5]} outside the vocabulary [0, {vocab})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.max_sequence_length:
        raise InferenceConfigError(
            f"context too long: prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the "
            f"model's maximum sequence length {model.max_sequence_length}"
        )
    return prompts

