"""POST /v1/completions: OpenAI's completion request to an engine job, and the result to a
reply or to its stream of server-sent chunks.

OpenAI's conventions: a choice per prompt; the text ends before a stop sequence or the
end-of-document token (finish_reason "stop"), else at max_tokens ("length"); echo puts the
prompt first. An empty prompt starts from the end-of-document token. logprobs give each
chosen token's log-probability (top_logprobs holds only the chosen token: the engine keeps
no alternatives); prompt tokens, which the engine does not score, get null.

A stream replays the finished result token by token: the engine hands back whole
generations, so the first chunk comes when the batch is done. The chunks' texts add up
to the non-streamed text exactly.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, List, Optional

from megatron.early_exit.inference import GenerationResult
from megatron.early_exit.server.jobs import Job, ModelLimits, RequestError, build_sampling, build_strategy, check_prompts
from megatron.early_exit.server.schemas import (
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage,
)
from megatron.early_exit.server.text import Continuation, find_stop, single_token_stops, tokenize_prompts


@dataclass
class Prompts:
    ids: List[List[int]]
    texts: List[str]  # as given, or detokenized when given as token ids


def read_prompts(request: CompletionRequest, tokenizer) -> Prompts:
    prompt = request.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise RequestError("prompt", "no prompts given")
    if isinstance(prompt[0], str):
        ids = tokenize_prompts(tokenizer, prompt, "prompt")
        ids = [p if p else [tokenizer.eod] for p in ids]
        return Prompts(ids, list(prompt))
    ids = [list(prompt)] if isinstance(prompt[0], int) else [list(p) for p in prompt]
    return Prompts(ids, [tokenizer.detokenize(p) if p else "" for p in ids])


def completion_job(request: CompletionRequest, tokenizer, limits: ModelLimits) -> tuple[Job, Prompts]:
    sampling = build_sampling(request.temperature, request.top_k, request.top_p, request.seed)
    strategy = build_strategy(request, limits, sampling.greedy)
    prompts = read_prompts(request, tokenizer)
    check_prompts(prompts.ids, request.max_tokens, limits, "prompt", "max_tokens")
    stops = [tokenizer.eod] + single_token_stops(tokenizer, request.stop_list)
    job = Job(tuple(map(tuple, prompts.ids)), strategy, sampling, request.max_tokens, tuple(dict.fromkeys(stops)))
    return job, prompts


@dataclass
class ChoiceText:
    """One prompt's generation as the reply shows it."""

    index: int
    prompt_text: str  # shown first with echo
    prompt_ids: List[int]
    text: str  # the generation, cut before a stop sequence
    tokens: List[int]  # the generated tokens behind `text`
    logprobs: List[float]
    exit_layers: List[int]
    finish_reason: str

    def pieces(self, tokenizer) -> List[str]:
        return Continuation(tokenizer, self.prompt_ids).pieces(self.tokens, self.text)


def choice_texts(request: CompletionRequest, tokenizer, prompts: Prompts, result: GenerationResult) -> List[ChoiceText]:
    stop_ids = set(single_token_stops(tokenizer, request.stop_list))
    out = []
    for i, (tokens, logprobs, exits) in enumerate(zip(result.tokens, result.logprobs, result.exit_layers)):
        finish = "stop" if tokens and tokens[-1] in stop_ids else "length"
        if tokens and tokens[-1] == tokenizer.eod:  # the end of document stops, unseen
            tokens, logprobs, exits, finish = tokens[:-1], logprobs[:-1], exits[:-1], "stop"
        continuation = Continuation(tokenizer, prompts.ids[i])
        stop = find_stop(continuation, tokens, request.stop_list)
        if stop is not None:
            n = stop.num_tokens
            tokens, logprobs, exits, finish = tokens[:n], logprobs[:n], exits[:n], "stop"
            text = stop.text[: stop.text_end]
        else:
            text = continuation.text(tokens)
        out.append(ChoiceText(i, prompts.texts[i], prompts.ids[i], text, list(tokens), list(logprobs), list(exits), finish))
    return out


def completion(request: CompletionRequest, tokenizer, model_name: str, prompts: Prompts,
               result: GenerationResult) -> tuple[Completion, List[ChoiceText]]:
    texts = choice_texts(request, tokenizer, prompts, result)
    choices = [_choice(request, tokenizer, c) for c in texts]
    prompt_tokens = sum(len(p) for p in prompts.ids)
    completion_tokens = result.num_generated
    reply = Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_name, choices=choices,
                       usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                   total_tokens=prompt_tokens + completion_tokens))
    return reply, texts


def _choice(request: CompletionRequest, tokenizer, c: ChoiceText) -> CompletionChoice:
    logprobs = None
    if request.logprobs is not None:
        head = prompt_pieces(tokenizer, c) if request.echo else []
        logprobs = _logprobs(head + c.pieces(tokenizer), [None] * len(head) + c.logprobs,
                             request.logprobs > 0)
    return CompletionChoice(
        index=c.index, text=(c.prompt_text + c.text) if request.echo else c.text, logprobs=logprobs,
        finish_reason=c.finish_reason, exit_layers=c.exit_layers,
        probs=[math.exp(lp) for lp in c.logprobs] if request.print_max_prob else None,
    )


def _logprobs(pieces: List[str], values: List[Optional[float]], with_top: bool, offset: int = 0) -> CompletionLogprobs:
    offsets, at = [], offset
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    top = [None if v is None else {p: v} for p, v in zip(pieces, values)] if with_top else None
    return CompletionLogprobs(tokens=pieces, token_logprobs=values, top_logprobs=top, text_offset=offsets)


def prompt_pieces(tokenizer, c: ChoiceText) -> List[str]:
    """The echoed prompt as one piece per prompt token."""
    return Continuation(tokenizer, []).pieces(c.prompt_ids, c.prompt_text)


# -- streaming -----------------------------------------------------------------------------------------


def stream_chunks(request: CompletionRequest, tokenizer, reply: Completion, texts: List[ChoiceText]) -> Iterator[Completion]:
    """The reply as chunks: per choice, the echoed prompt, one chunk per generated token, and
    a last empty chunk with the finish reason; then the usage, when asked for."""

    def chunk(**fields) -> Completion:
        return Completion(id=reply.id, created=reply.created, model=reply.model, choices=[CompletionChoice(**fields)])

    with_logprobs, with_top = request.logprobs is not None, bool(request.logprobs)
    for c in texts:
        at = 0
        if request.echo:
            head = prompt_pieces(tokenizer, c)
            lp = _logprobs(head, [None] * len(head), with_top) if with_logprobs else None
            yield chunk(index=c.index, text=c.prompt_text, logprobs=lp, exit_layers=[])
            at = len(c.prompt_text)
        for i, piece in enumerate(c.pieces(tokenizer)):
            lp = _logprobs([piece], [c.logprobs[i]], with_top, at) if with_logprobs else None
            probs = [math.exp(c.logprobs[i])] if request.print_max_prob else None
            yield chunk(index=c.index, text=piece, logprobs=lp, exit_layers=[c.exit_layers[i]], probs=probs)
            at += len(piece)
        yield chunk(index=c.index, text="", exit_layers=[], finish_reason=c.finish_reason)
    if request.stream_options is not None and request.stream_options.include_usage:
        yield Completion(id=reply.id, created=reply.created, model=reply.model, choices=[], usage=reply.usage)
