"""generate(): prompts in, a GenerationResult out, for every strategy.

prefill            (decode.py) every prompt at full depth in one batched pass; its first token
strategy.decode    the strategy's own loop after it: decode.decode_tokens under its exit
                   policy, or speculative.speculative_decode (draft and verify rounds)
pipeline_generate  (pipeline.py) a model split into pipeline stages, or kv="pipeline":
                   every stage runs its layers for every row, exits decide, with the
                   options the strategy gives (strategy.stage_options)
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from megatron.early_exit.inference.context import inference_context
from megatron.early_exit.inference.decode import decode_one_token, decode_tokens, prefill  # noqa: F401 -- the loop's parts
from megatron.early_exit.inference.decoder import Decoder
from megatron.early_exit.inference.errors import InferenceConfigError
from megatron.early_exit.inference.pipeline import pipeline_generate
from megatron.early_exit.inference.prompts import check_prompts
from megatron.early_exit.inference.result import GenerationResult, TokenCallback, Transcript, clock
from megatron.early_exit.inference.sampling import SamplingParams
from megatron.early_exit.inference.strategies import FullDepth


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
    between_rounds: Optional[Callable[[], None]] = None,
) -> GenerationResult:
    """Continue each prompt (a list of token ids; lengths may differ) by up to
    `max_new_tokens` tokens, stopping a row early at any of `stop_tokens`.

    top_n > 0 keeps each token's top_n likeliest alternatives (result.top_tokens and
    top_logprobs); `on_tokens` is called with a TokenEvent each time a row's tokens are
    appended, while decoding goes on (on the rank that picks the tokens: the first stage).
    `cancelled()`, asked before each step on one stage, names rows to stop now (their
    callers went away); every tensor-parallel rank must get the same answer. `between_rounds()`
    runs after each draft-and-verify round of self-speculative decoding."""
    prompts = validate_prompts(model, prompts, max_new_tokens, top_n)
    strategy.check(sampling)
    if not (model.pre_process and model.post_process) or strategy.over_stages:
        return _generate_over_stages(model, prompts, strategy, max_new_tokens, sampling, stop_tokens, top_n, on_tokens)
    result = GenerationResult(
        [[] for _ in prompts],
        [[] for _ in prompts],
        [[] for _ in prompts],
        num_layers=model.config.num_layers,
        strategy=strategy.name,
    )
    with inference_context(model):
        decoder = Decoder(model, len(prompts), max(len(p) for p in prompts) + max_new_tokens)
        transcript = Transcript(
            result,
            max_new_tokens,
            frozenset(int(t) for t in stop_tokens),
            sampling,
            sampling.make_generators(decoder.device, len(prompts)),
            active=list(range(len(prompts))),
            top_n=top_n,
            on_tokens=on_tokens,
            previous=[p[-1] for p in prompts],
            cancelled=cancelled,
            between_rounds=between_rounds,
        )
        start = clock(decoder.device)
        prefill(decoder, transcript, prompts)
        result.prefill_seconds = clock(decoder.device) - start
        cpu_start = time.process_time()
        strategy.decode(decoder, transcript)
        result.decode_seconds = clock(decoder.device) - start - result.prefill_seconds
        result.decode_cpu_seconds = time.process_time() - cpu_start
    return result


def _generate_over_stages(
    model, prompts, strategy, max_new_tokens, sampling, stop_tokens, top_n=0, on_tokens=None
) -> GenerationResult:
    """Pipeline-based early exit (pipeline.py); FullDepth runs there as threshold infinity."""
    options = strategy.stage_options(model)
    with inference_context(model):
        return pipeline_generate(
            model,
            prompts,
            max_new_tokens,
            sampling,
            stop_tokens,
            strategy.name,
            top_n=top_n,
            on_tokens=on_tokens,
            **options,
        )


def validate_prompts(model, prompts, max_new_tokens: int, top_n: int = 0) -> List[List[int]]:
    """The prompts as lists of ints, checked against the model (prompts.check_prompts)."""
    if not 0 <= top_n <= model.vocab_size:
        raise InferenceConfigError(f"top_n must be in [0, {model.vocab_size}], got {top_n}")
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    return check_prompts(prompts, max_new_tokens, model.vocab_size, model.max_sequence_length)
