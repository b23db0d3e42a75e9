"""POST /v1/completions: OpenAI's completion request to engine jobs, and their results to a
reply or to its stream of server-sent chunks.

OpenAI's conventions: a choice per prompt; the text ends before a stop sequence or the
end-of-document token (finish_reason "stop"), else at max_tokens ("length"); echo puts the
prompt first. An empty prompt starts from the end-of-document token. logprobs N gives each
token's log-probability and, in top_logprobs, its N likeliest alternatives (with the chosen
token, as vLLM does), under the layer that produced it. With echo, the prompt is scored
too (a ScoreJob, under the final layer or `exit_layer`): every prompt token but the first,
which nothing predicts, gets its log-probability. max_tokens 0 with echo scores only.

A stream sends each token's text as the engine decodes it (the job's listener); the
chunks' texts add up to the non-streamed text exactly.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, List, Optional

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
from megatron.early_exit.server.schemas import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
)
from megatron.early_exit.server.streaming import StreamedToken, streamed_tokens
from megatron.early_exit.server.text import (
    Continuation,
    TextStream,
    alternative_texts,
    find_stop,
    single_token_stops,
    tokenize_prompts,
)


@dataclass
class Prompts:
    ids: List[List[int]]
    texts: List[str]  # as given, or detokenized when given as token ids


@dataclass
class CompletionJobs:
    """What a completion request asks of the engine: a generation, a prompt scoring, or both."""

    prompts: Prompts
    generate: Optional[Job] = None
    score: Optional[ScoreJob] = None


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
    for i, p in enumerate(ids):  # before anything detokenizes them
        bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise RequestError(
                f"prompt[{i}]", f"token ids {bad[:5]} outside the tokenizer's vocabulary [0, {tokenizer.vocab_size})"
            )
    return Prompts(ids, [tokenizer.detokenize(p) if p else "" for p in ids])


def completion_jobs(request: CompletionRequest, tokenizer, limits: ModelLimits) -> CompletionJobs:
    if request.max_tokens == 0 and not request.echo:
        raise RequestError("max_tokens", "0 generates nothing: set echo true to score the prompt, or max_tokens >= 1")
    sampling = build_sampling(request.temperature, request.top_k, request.top_p, request.seed)
    strategy = build_strategy(request, limits, sampling.greedy)
    prompts = read_prompts(request, tokenizer)
    check_prompts(prompts.ids, request.max_tokens, limits, "prompt", "max_tokens")
    jobs = CompletionJobs(prompts)
    top_n = request.logprobs or 0
    if request.echo and request.logprobs is not None:
        jobs.score = ScoreJob(tuple(map(tuple, prompts.ids)), scoring_exit(request, limits), top_n)
    if request.max_tokens > 0:
        stops = [tokenizer.eod] + single_token_stops(tokenizer, request.stop_list)
        jobs.generate = Job(
            tuple(map(tuple, prompts.ids)), strategy, sampling, request.max_tokens, tuple(dict.fromkeys(stops)), top_n
        )
    return jobs


def empty_result(rows: int, num_layers: int) -> GenerationResult:
    """The result of generating nothing (max_tokens 0)."""
    return GenerationResult([[] for _ in range(rows)], [[] for _ in range(rows)], [[] for _ in range(rows)], num_layers)


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
    top_tokens: List[List[int]] = field(default_factory=list)  # per token, with logprobs N > 0
    top_logprobs: List[List[float]] = field(default_factory=list)

    def pieces(self, tokenizer) -> List[str]:
        return Continuation(tokenizer, self.prompt_ids).pieces(self.tokens, self.text)


def choice_texts(request, tokenizer, prompts: Prompts, result: GenerationResult) -> List[ChoiceText]:
    """Each prompt's generation, cut at the end-of-document token or a stop sequence
    (`request` has stop_list)."""
    stop_ids = set(single_token_stops(tokenizer, request.stop_list))
    out = []
    for i, (tokens, logprobs, exits) in enumerate(zip(result.tokens, result.logprobs, result.exit_layers)):
        top_t = result.top_tokens[i] if result.top_tokens else [[] for _ in tokens]
        top_v = result.top_logprobs[i] if result.top_logprobs else [[] for _ in tokens]
        finish = "stop" if tokens and tokens[-1] in stop_ids else "length"
        n = len(tokens)
        if tokens and tokens[-1] == tokenizer.eod:  # the end of document stops, unseen
            n, finish = n - 1, "stop"
        continuation = Continuation(tokenizer, prompts.ids[i])
        stop = find_stop(continuation, tokens[:n], request.stop_list)
        if stop is not None:
            n, finish, text = stop.num_tokens, "stop", stop.text[: stop.text_end]
        else:
            text = continuation.text(tokens[:n])
        out.append(
            ChoiceText(
                i,
                prompts.texts[i],
                prompts.ids[i],
                text,
                list(tokens[:n]),
                list(logprobs[:n]),
                list(exits[:n]),
                finish,
                list(top_t[:n]),
                list(top_v[:n]),
            )
        )
    return out


def completion(
    request: CompletionRequest,
    tokenizer,
    model_name: str,
    prompts: Prompts,
    result: GenerationResult,
    scores: Optional[ScoreResult] = None,
) -> tuple[Completion, List[ChoiceText]]:
    texts = choice_texts(request, tokenizer, prompts, result)
    choices = [_choice(request, tokenizer, c, scores) for c in texts]
    reply = Completion(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model_name,
        choices=choices,
        usage=usage(prompts, result),
    )
    return reply, texts


def usage(prompts: Prompts, result: GenerationResult) -> Usage:
    prompt_tokens, completion_tokens = sum(len(p) for p in prompts.ids), result.num_generated
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _choice(request: CompletionRequest, tokenizer, c: ChoiceText, scores: Optional[ScoreResult]) -> CompletionChoice:
    logprobs = None
    if request.logprobs is not None:
        head = prompt_logprobs(request, tokenizer, c, scores) if request.echo else _logprobs([], [], None)
        pieces = c.pieces(tokenizer)
        body = _logprobs(
            pieces,
            c.logprobs,
            _tops(tokenizer, c.prompt_ids, c.tokens, pieces, c.logprobs, c.top_tokens, c.top_logprobs)
            if request.logprobs
            else None,
        )
        logprobs = _join(head, body)
    return CompletionChoice(
        index=c.index,
        text=(c.prompt_text + c.text) if request.echo else c.text,
        logprobs=logprobs,
        finish_reason=c.finish_reason,
        exit_layers=c.exit_layers,
        probs=[math.exp(lp) for lp in c.logprobs] if request.print_max_prob else None,
    )


def prompt_logprobs(request: CompletionRequest, tokenizer, c: ChoiceText, scores: ScoreResult) -> CompletionLogprobs:
    """The echoed prompt's pieces, with the score of every token after the first."""
    pieces = Continuation(tokenizer, []).pieces(c.prompt_ids, c.prompt_text)
    values = scores.logprobs[c.index]
    tops = None
    if request.logprobs:
        tops = [None] + _tops(
            tokenizer,
            c.prompt_ids[:1],
            c.prompt_ids[1:],
            pieces[1:],
            values,
            scores.top_tokens[c.index],
            scores.top_logprobs[c.index],
        )
    return _logprobs(pieces, [None] + list(values), tops)


def _tops(tokenizer, context, tokens, pieces, values, top_tokens, top_values) -> List[Dict[str, float]]:
    """Per token, {text: log-probability} of its alternatives, best first, then the token
    itself under its piece when it is not among them (two ids with one text keep the
    likelier). `context`: the tokens before the first of `tokens`."""
    out, context = [], list(context)
    for token, piece, value, ids, lps in zip(tokens, pieces, values, top_tokens, top_values):
        alternatives: Dict[str, float] = {}
        for text, lp in zip(alternative_texts(tokenizer, context, token, piece, ids), lps):
            alternatives.setdefault(text, lp)
        alternatives.setdefault(piece, value)
        out.append(alternatives)
        context.append(token)
    return out


def _logprobs(pieces: List[str], values: List[Optional[float]], tops, offset: int = 0) -> CompletionLogprobs:
    offsets, at = [], offset
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return CompletionLogprobs(tokens=pieces, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def _join(head: CompletionLogprobs, body: CompletionLogprobs) -> CompletionLogprobs:
    shift = sum(len(p) for p in head.tokens)
    tops = (
        None
        if head.top_logprobs is None and body.top_logprobs is None
        else (head.top_logprobs or []) + (body.top_logprobs or [])
    )
    return CompletionLogprobs(
        tokens=head.tokens + body.tokens,
        token_logprobs=head.token_logprobs + body.token_logprobs,
        top_logprobs=tops,
        text_offset=head.text_offset + [o + shift for o in body.text_offset],
    )


# -- streaming -----------------------------------------------------------------------------------------


async def stream_chunks(
    request: CompletionRequest,
    tokenizer,
    model_name: str,
    prompts: Prompts,
    scores: Optional[ScoreResult],
    events: AsyncIterator,
) -> AsyncIterator[Completion]:
    """Chunks as the engine decodes: per choice the echoed prompt first; then one chunk per
    generated token, sent when it is decoded; then per choice the rest of its text and an
    empty chunk with the finish reason; then the usage, when asked for. `events` yields the
    engine's TokenEvents and, last, the GenerationResult."""
    reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(**fields) -> Completion:
        return Completion(id=reply_id, created=created, model=model_name, choices=[CompletionChoice(**fields)])

    with_logprobs = request.logprobs is not None
    streams = [TextStream(tokenizer, p, request.stop_list, tokenizer.eod) for p in prompts.ids]
    offsets = [0] * len(prompts.ids)
    if request.echo:
        for i, text in enumerate(prompts.texts):
            c = ChoiceText(i, text, prompts.ids[i], "", [], [], [], "length")
            lp = prompt_logprobs(request, tokenizer, c, scores) if with_logprobs and scores is not None else None
            yield chunk(index=i, text=text, logprobs=lp, exit_layers=[])
            offsets[i] = len(text)
    result = None
    async for item in streamed_tokens(events, streams, tokenizer.eod):
        if not isinstance(item, StreamedToken):
            result = item
            break
        lp = None
        if with_logprobs:
            tops = (
                _tops(
                    tokenizer,
                    prompts.ids[item.row] + item.previous,
                    [item.token],
                    [item.piece],
                    [item.logprob],
                    [item.top_tokens],
                    [item.top_logprobs],
                )
                if request.logprobs
                else None
            )
            lp = _logprobs([item.piece], [item.logprob], tops, offsets[item.row])
        probs = [math.exp(item.logprob)] if request.print_max_prob else None
        yield chunk(index=item.row, text=item.piece, logprobs=lp, exit_layers=[item.exit_layer], probs=probs)
        offsets[item.row] += len(item.piece)
    result = result or empty_result(len(prompts.ids), 0)
    for c in choice_texts(request, tokenizer, prompts, result):
        rest = streams[c.index].finish(c.text)
        if rest:
            yield chunk(index=c.index, text=rest, exit_layers=[])
        yield chunk(index=c.index, text="", exit_layers=[], finish_reason=c.finish_reason)
    if request.stream_options is not None and request.stream_options.include_usage:
        yield Completion(id=reply_id, created=created, model=model_name, choices=[], usage=usage(prompts, result))
