"""PUT /api: Megatron-LM's (and EE-LLM's) request to engine jobs, and their results to its reply.

Megatron-LM's conventions are kept: temperature 1 and top_p 0 (off) by default, so a
request without sampling fields samples; top_k 1 (or temperature 0) is greedy; add_BOS
puts the tokenizer's BOS (its end-of-document token when it has none) before the prompt;
a prompt stops at the end-of-document token (or `stop_token`), or at the token that
completes a newline (stop_on_eol), a blank line (stop_on_double_eol) or a stop sequence,
that token kept; `text` holds prompt + generation unless echo_prompts is false, and
`segments` the text each of its tokens adds, so that they join to `text`.

`logprobs` are Megatron-LM's: aligned with tokens[1:], the prompt's (scored in one pass by
a ScoreJob, under the final layer or `exit_layer`) then the generation's; with echo_prompts
false, the generated tokens' only. tokens_to_generate 0 scores the prompts (logprobs are
then always returned, as EE-LLM does). beam_width 1 is greedy decoding with Megatron-LM's
beam `scores` (sum of the generated log-probabilities / length ** length_penalty); wider
beams are refused.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional

from megatron.early_exit.inference import GenerationResult
from megatron.early_exit.inference.scoring import ScoreResult
from megatron.early_exit.server.jobs import (
    Job,
    ModelLimits,
    RequestError,
    ScoreJob,
    build_sampling,
    build_strategy,
    check_prompts,
    scoring_exit,
)
from megatron.early_exit.server.schemas import ApiRequest, ApiResponse
from megatron.early_exit.server.text import Continuation, find_stop, single_token_stops, tokenize_prompts


@dataclass
class ApiJobs:
    prompts: List[List[int]]
    generate: Optional[Job] = None
    score: Optional[ScoreJob] = None


def stop_sequences(request: ApiRequest) -> List[str]:
    """stop_sequences, plus a newline (stop_on_eol) and a blank line (stop_on_double_eol)."""
    return (
        list(request.stop_sequences or [])
        + (["\n"] if request.stop_on_eol else [])
        + (["\n\n"] if request.stop_on_double_eol else [])
    )


def wants_logprobs(request: ApiRequest) -> bool:
    return request.logprobs or request.tokens_to_generate == 0


def api_jobs(request: ApiRequest, tokenizer, limits: ModelLimits) -> ApiJobs:
    if request.beam_width is not None and request.beam_width > 1:
        raise RequestError(
            "beam_width",
            f"{request.beam_width}: beam search wider than 1 is not supported "
            "(1 is greedy decoding with `scores`; omit it to sample)",
        )
    if request.beam_width is not None and len(request.prompts) > 1:
        raise RequestError("beam_width", "beam search takes one prompt (Megatron-LM's rule)")
    greedy = request.beam_width is not None
    sampling = build_sampling(
        0.0 if greedy else request.temperature,
        1 if greedy else request.top_k,
        (request.top_p or 1.0) if not greedy else 1.0,
        None if request.random_seed < 0 else request.random_seed,
    )
    if request.prevent_newline_after_colon:
        if request.speculative is not None:
            raise RequestError(
                "prevent_newline_after_colon",
                "self-speculative decoding keeps the full model's greedy tokens: drop one of them",
            )
        sampling = _ban_newline_after_colon(sampling, tokenizer)
    strategy = build_strategy(request, limits, sampling.greedy)
    bos = (tokenizer.bos if tokenizer.bos is not None else tokenizer.eod) if request.add_BOS else None
    prompts = tokenize_prompts(tokenizer, request.prompts, "prompts", bos)
    check_prompts(prompts, request.tokens_to_generate, limits, "prompts", "tokens_to_generate")
    jobs = ApiJobs(prompts)
    if wants_logprobs(request) and request.echo_prompts:
        jobs.score = ScoreJob(tuple(map(tuple, prompts)), scoring_exit(request, limits))
    if request.tokens_to_generate > 0:
        stops = [tokenizer.eod] + single_token_stops(tokenizer, stop_sequences(request))
        if request.stop_token is not None:
            if request.stop_token >= limits.vocab_size:
                raise RequestError(
                    "stop_token", f"{request.stop_token} is outside the vocabulary [0, {limits.vocab_size})"
                )
            stops.append(request.stop_token)
        jobs.generate = Job(
            tuple(map(tuple, prompts)), strategy, sampling, request.tokens_to_generate, tuple(dict.fromkeys(stops))
        )
    return jobs


def _ban_newline_after_colon(sampling, tokenizer):
    """Megatron-LM's rule: the token of '\\n' never right after the token of ':'."""
    try:
        colon, newline = tokenizer.tokenize(":"), tokenizer.tokenize("\n")
    except ValueError:
        colon = newline = []
    if not colon or not newline:
        raise RequestError("prevent_newline_after_colon", "this tokenizer has no ':' or newline token")
    return dataclasses.replace(sampling, ban_after=((colon[0], newline[0]),))


def api_response(
    request: ApiRequest,
    tokenizer,
    prompts: List[List[int]],
    result: Optional[GenerationResult],
    scores: Optional[ScoreResult],
) -> ApiResponse:
    texts, segments, tokens, logprobs, exits, probs, beam_scores = [], [], [], [], [], [], []
    for i, prompt in enumerate(prompts):
        generated, row_logprobs, row_exits = (
            (result.tokens[i], result.logprobs[i], result.exit_layers[i]) if result is not None else ([], [], [])
        )
        continuation = Continuation(tokenizer, prompt)
        stop = find_stop(continuation, generated, stop_sequences(request))
        if stop is not None:  # up to the token that completed the stop sequence
            generated, row_logprobs, row_exits = (x[: stop.num_tokens] for x in (generated, row_logprobs, row_exits))
        if request.echo_prompts:
            ids = list(prompt) + list(generated)
            text = tokenizer.detokenize(ids)
            pieces = Continuation(tokenizer, []).pieces(ids, text)
            row = (list(scores.logprobs[i]) if scores is not None else []) + list(row_logprobs)
        else:
            ids, text = list(generated), continuation.text(generated)
            pieces, row = continuation.pieces(generated, text), list(row_logprobs)
        texts.append(text)
        segments.append(pieces)
        tokens.append(ids)
        logprobs.append(row)
        exits.append(list(row_exits))
        probs.append([math.exp(lp) for lp in row_logprobs])
        beam_scores.append(sum(row_logprobs) / len(generated) ** request.length_penalty if generated else 0.0)
    return ApiResponse(
        text=texts,
        segments=segments,
        tokens=tokens,
        exit_layers=exits,
        logprobs=logprobs if wants_logprobs(request) else None,
        probs=probs if request.print_max_prob else None,
        scores=beam_scores if request.beam_width is not None else None,
    )
