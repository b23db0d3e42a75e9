"""POST /v1/chat/completions: OpenAI's chat request, through the tokenizer's chat template
(with the generation prompt), to one generation job; the result to a reply or a stream.

The text ends before a stop sequence or the end-of-document token ("stop"), else at the
budget ("length"): max_tokens (or max_completion_tokens), by default the rest of the
model's context. logprobs/top_logprobs follow OpenAI's chat shape. A stream sends a role
delta, then each token's text when it is decoded, then the finish reason.
"""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, List, Optional

from megatron.early_exit.inference import GenerationResult
from megatron.early_exit.server.jobs import (
    Job,
    ModelLimits,
    RequestError,
    build_sampling,
    build_strategy,
    check_prompts,
)
from megatron.early_exit.server.openai_api import ChoiceText, Prompts, choice_texts, usage
from megatron.early_exit.server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletion,
    ChatDelta,
    ChatLogprobs,
    ChatRequest,
    TokenLogprob,
    TopLogprob,
)
from megatron.early_exit.server.streaming import StreamedToken, streamed_tokens
from megatron.early_exit.server.text import TextStream, alternative_texts, single_token_stops
from megatron.early_exit.server.tokenizer_api import TokenizerFacts


def chat_job(request: ChatRequest, facts: TokenizerFacts, limits: ModelLimits) -> tuple[Job, Prompts]:
    if (
        request.max_tokens is not None
        and request.max_completion_tokens is not None
        and request.max_tokens != request.max_completion_tokens
    ):
        raise RequestError("max_completion_tokens", "differs from max_tokens: give one of them")
    if request.top_logprobs and not request.logprobs:
        raise RequestError("top_logprobs", "needs logprobs true")
    sampling = build_sampling(request.temperature, request.top_k, request.top_p, request.seed)
    strategy = build_strategy(request, limits, sampling.greedy)
    text = facts.render_chat(request.messages)
    ids = facts.tokenize(text, "messages") or [facts.tokenizer.eod]
    budget = request.max_tokens or request.max_completion_tokens
    if budget is None:
        budget = max(limits.max_sequence_length - len(ids), 1)
    check_prompts([ids], budget, limits, "messages", "max_tokens")
    stops = [facts.tokenizer.eod] + single_token_stops(facts.tokenizer, request.stop_list)
    top_n = request.top_logprobs or 0
    return Job((tuple(ids),), strategy, sampling, budget, tuple(dict.fromkeys(stops)), top_n), Prompts([ids], [text])


def _token_logprobs(tokenizer, pieces: List[str], c: ChoiceText, top_n: int) -> List[TokenLogprob]:
    """`c.prompt_ids`: the tokens before the first of `c.tokens` (alternatives render after them)."""
    out, context = [], list(c.prompt_ids)
    for i, (token, piece, value) in enumerate(zip(c.tokens, pieces, c.logprobs)):
        tops = []
        if top_n:
            texts = alternative_texts(tokenizer, context, token, piece, c.top_tokens[i])
            tops = [
                TopLogprob(token=text, logprob=v, bytes=list(text.encode()))
                for text, v in zip(texts, c.top_logprobs[i])
            ]
        out.append(TokenLogprob(token=piece, logprob=value, bytes=list(piece.encode()), top_logprobs=tops))
        context.append(token)
    return out


def chat_completion(
    request: ChatRequest, tokenizer, model_name: str, prompts: Prompts, result: GenerationResult
) -> ChatCompletion:
    c = choice_texts(request, tokenizer, prompts, result)[0]
    logprobs = (
        ChatLogprobs(content=_token_logprobs(tokenizer, c.pieces(tokenizer), c, request.top_logprobs or 0))
        if request.logprobs
        else None
    )
    choice = ChatChoice(
        index=0,
        message=AssistantMessage(content=c.text),
        logprobs=logprobs,
        finish_reason=c.finish_reason,
        exit_layers=c.exit_layers,
    )
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model_name,
        choices=[choice],
        usage=usage(prompts, result),
    )


async def chat_chunks(
    request: ChatRequest, tokenizer, model_name: str, prompts: Prompts, events: AsyncIterator
) -> AsyncIterator[ChatChunk]:
    """The reply as it is decoded; `events` yields TokenEvents and, last, the GenerationResult."""
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: ChatDelta, finish: Optional[str] = None, logprobs=None, exits=()) -> ChatChunk:
        return ChatChunk(
            id=reply_id,
            created=created,
            model=model_name,
            choices=[
                ChatChunkChoice(index=0, delta=delta, finish_reason=finish, logprobs=logprobs, exit_layers=list(exits))
            ],
        )

    yield chunk(ChatDelta(role="assistant", content=""))
    stream = TextStream(tokenizer, prompts.ids[0], request.stop_list, tokenizer.eod)
    result = None
    async for item in streamed_tokens(events, [stream], tokenizer.eod):
        if not isinstance(item, StreamedToken):
            result = item
            break
        logprobs = None
        if request.logprobs:
            context = prompts.ids[0] + item.previous
            one = ChoiceText(
                0,
                "",
                context,
                item.piece,
                [item.token],
                [item.logprob],
                [item.exit_layer],
                "",
                [item.top_tokens or []],
                [item.top_logprobs or []],
            )
            logprobs = ChatLogprobs(content=_token_logprobs(tokenizer, [item.piece], one, request.top_logprobs or 0))
        yield chunk(ChatDelta(content=item.piece), logprobs=logprobs, exits=[item.exit_layer])
    c = choice_texts(request, tokenizer, prompts, result)[0]
    rest = stream.finish(c.text)
    if rest:
        yield chunk(ChatDelta(content=rest))
    yield chunk(ChatDelta(), finish=c.finish_reason)
    if request.stream_options is not None and request.stream_options.include_usage:
        yield ChatChunk(id=reply_id, created=created, model=model_name, choices=[], usage=usage(prompts, result))
