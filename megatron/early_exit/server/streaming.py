"""Streamed replies: the one generator that turns the engine's token events into the text
each token adds (every streamed endpoint formats its chunks from it), and the server-sent
events that carry the chunks.

A token's text leaves as soon as it is decoded, except what could still change: the start
of a possible stop sequence, a character whose bytes are not all in (text.TextStream). The
end-of-document token and whatever follows a stop sequence are never sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator, List, Optional, Sequence, Union

from fastapi.responses import StreamingResponse

from megatron.early_exit.inference import GenerationResult
from megatron.early_exit.server.guard import stream_error
from megatron.early_exit.server.text import TextStream


@dataclass
class StreamedToken:
    """One decoded token of prompt `row`, with the text it adds to the reply."""

    row: int
    token: int
    piece: str
    logprob: float
    exit_layer: int
    previous: List[int]  # the tokens generated before it (after the prompt)
    top_tokens: Optional[List[int]] = None  # its alternatives, when asked for
    top_logprobs: Optional[List[float]] = None


async def streamed_tokens(
    events: AsyncIterator, streams: Sequence[TextStream], eod: Optional[int]
) -> AsyncIterator[Union[StreamedToken, GenerationResult]]:
    """The tokens of `events` (TokenEvents, then the GenerationResult, as Service.stream
    yields them) as each prompt's text stream lets them out; last, the result (None when
    the events end without one)."""
    async for event in events:
        if isinstance(event, GenerationResult):
            yield event
            return
        stream = streams[event.row]
        for j, token in enumerate(event.tokens):
            if stream.stopped:
                break
            piece = stream.add(token)
            if stream.stopped and token == eod:
                break
            yield StreamedToken(
                event.row,
                token,
                piece,
                event.logprobs[j],
                event.exit_layers[j],
                stream.tokens[:-1],
                event.top_tokens[j] if event.top_tokens else None,
                event.top_logprobs[j] if event.top_logprobs else None,
            )
    yield None


def sse(chunks) -> StreamingResponse:
    """Server-sent events of every streamed endpoint: the chunks, then [DONE]. An error after
    the reply started ends it with an error event in the server's error shape, then [DONE]."""

    async def lines():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk.model_dump())}\n\n"
        except Exception as err:  # noqa: BLE001 -- the status line is sent: the error goes in the stream
            yield f"data: {json.dumps(stream_error(err))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")
