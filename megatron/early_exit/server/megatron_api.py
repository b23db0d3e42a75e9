"""PUT /api: Megatron-LM's request to an engine job, and the result to its reply.

Megatron-LM's conventions are kept: temperature 1 and top_p 0 (off) by default, so a
request without sampling fields samples; top_k 1 (or temperature 0) is greedy; add_BOS
puts the tokenizer's BOS (its end-of-document token when it has none) before the prompt;
a prompt stops at the end-of-document token, or at the token that completes a newline
(stop_on_eol), a blank line (stop_on_double_eol) or a stop sequence, that token kept;
`text` holds prompt + generation unless echo_prompts is false. `logprobs` cover the
generated tokens (the engine does not score prompts).
"""

from __future__ import annotations

import math
from typing import List

from megatron.early_exit.inference import GenerationResult
from megatron.early_exit.server.jobs import Job, ModelLimits, build_sampling, build_strategy, check_prompts
from megatron.early_exit.server.schemas import ApiRequest, ApiResponse
from megatron.early_exit.server.text import Continuation, find_stop, single_token_stops, tokenize_prompts


def stop_sequences(request: ApiRequest) -> List[str]:
    """stop_sequences, plus a newline (stop_on_eol) and a blank line (stop_on_double_eol)."""
    return (list(request.stop_sequences or []) + (["\n"] if request.stop_on_eol else [])
            + (["\n\n"] if request.stop_on_double_eol else []))


def api_job(request: ApiRequest, tokenizer, limits: ModelLimits) -> tuple[Job, List[List[int]]]:
    """(the job, the prompts' token ids)."""
    sampling = build_sampling(request.temperature, request.top_k, request.top_p or 1.0,
                              None if request.random_seed < 0 else request.random_seed)
    strategy = build_strategy(request, limits, sampling.greedy)
    bos = (tokenizer.bos if tokenizer.bos is not None else tokenizer.eod) if request.add_BOS else None
    prompts = tokenize_prompts(tokenizer, request.prompts, "prompts", bos)
    check_prompts(prompts, request.tokens_to_generate, limits, "prompts", "tokens_to_generate")
    stops = [tokenizer.eod] + single_token_stops(tokenizer, stop_sequences(request))
    job = Job(tuple(map(tuple, prompts)), strategy, sampling, request.tokens_to_generate, tuple(dict.fromkeys(stops)))
    return job, prompts


def api_response(request: ApiRequest, tokenizer, prompts: List[List[int]], result: GenerationResult) -> ApiResponse:
    texts, segments, tokens, logprobs, exits = [], [], [], [], []
    for prompt, generated, row_logprobs, row_exits in zip(prompts, result.tokens, result.logprobs, result.exit_layers):
        continuation = Continuation(tokenizer, prompt)
        stop = find_stop(continuation, generated, stop_sequences(request))
        if stop is not None:  # up to the token that completed the stop sequence
            generated, row_logprobs, row_exits = (x[: stop.num_tokens] for x in (generated, row_logprobs, row_exits))
        ids = list(prompt) + list(generated) if request.echo_prompts else list(generated)
        texts.append(tokenizer.detokenize(ids) if request.echo_prompts else continuation.text(generated))
        segments.append([tokenizer.detokenize([t]) for t in ids])
        tokens.append(ids)
        logprobs.append(list(row_logprobs))
        exits.append(list(row_exits))
    return ApiResponse(
        text=texts, segments=segments, tokens=tokens, exit_layers=exits,
        logprobs=logprobs if request.logprobs else None,
        probs=[[math.exp(lp) for lp in row] for row in logprobs] if request.print_max_prob else None,
    )
