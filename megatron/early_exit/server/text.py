"""Text on either side of the engine: tokenizing prompts, the text generated tokens add to a
prompt, stop sequences, and that text cut into one piece per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from megatron.early_exit.server.jobs import RequestError

CONTEXT_TOKENS = 8  # prompt tokens detokenized with a continuation: enough for spacing rules


def tokenize_prompts(tokenizer, prompts: Sequence[str], field: str, bos: Optional[int] = None) -> List[List[int]]:
    out = []
    for i, text in enumerate(prompts):
        try:
            ids = tokenizer.tokenize(text)
        except ValueError as err:  # e.g. NullTokenizer text that is not token ids
            raise RequestError(f"{field}[{i}]", str(err)) from None
        out.append(([bos] if bos is not None else []) + list(ids))
    return out


def single_token_stops(tokenizer, stops: Sequence[str]) -> List[int]:
    """Stop sequences that are exactly one token: the engine can stop on them at once."""
    ids = []
    for s in stops:
        try:
            tokens = tokenizer.tokenize(s)
        except ValueError:
            continue
        if len(tokens) == 1 and tokenizer.detokenize(tokens) == s:
            ids.append(tokens[0])
    return ids


class Continuation:
    """The text that generated tokens add after a prompt. Detokenizing them alone can lose
    what joins them to the prompt (SentencePiece drops a leading space, token-id text its
    separator), so they are detokenized after the prompt's last tokens, which are then cut."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.context = list(prompt_ids[-CONTEXT_TOKENS:])
        self.head = tokenizer.detokenize(self.context) if self.context else ""

    def text(self, tokens: Sequence[int]) -> str:
        tokens = list(tokens)
        full = self.tokenizer.detokenize(self.context + tokens)
        return full[len(self.head) :] if full.startswith(self.head) else self.tokenizer.detokenize(tokens)

    def pieces(self, tokens: Sequence[int], text: str) -> List[str]:
        """`text` (the tokens' text, possibly cut short) as one piece per token, adding up to
        `text` exactly: a piece is what its token adds to the text of the tokens before it (a
        token that completes a multi-byte character carries the whole character)."""
        pieces, emitted = [], 0
        for n in range(1, len(tokens) + 1):
            prefix = self.text(tokens[:n]) if n < len(tokens) else text
            end = max(len(prefix) if text.startswith(prefix) else emitted, emitted)
            pieces.append(text[emitted:end])
            emitted = end
        if pieces:
            pieces[-1] += text[emitted:]
        return pieces


def alternative_texts(tokenizer, context: Sequence[int], token: int, piece: str, ids: Sequence[int]) -> List[str]:
    """The text of each alternative `ids` at one position, rendered as the chosen `token`'s
    `piece` is: what it adds after `context` (the tokens before it), so that a SentencePiece
    word-start space is kept on both. The chosen token is its own piece (OpenAI's contract:
    top_logprobs[i] has tokens[i] as a key)."""
    after = Continuation(tokenizer, context)
    return [piece if t == token else after.text([t]) for t in ids]


@dataclass
class StopMatch:
    num_tokens: int  # tokens kept: up to and including the one that completed the stop sequence
    text_end: int  # where the stop sequence starts in `text`
    text: str  # the continuation text of the kept tokens


def find_stop(continuation: Continuation, tokens: Sequence[int], stops: Sequence[str]) -> Optional[StopMatch]:
    """The first token after which the generated text holds a stop sequence."""
    if not stops:
        return None
    for n in range(1, len(tokens) + 1):
        text = continuation.text(tokens[:n])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return StopMatch(n, min(hits), text)
    return None


class TextStream:
    """A generation's text, sent as its tokens arrive: each call to `add` returns the text
    they add, holding back what could still change (the start of a stop sequence, a
    character whose bytes are not all in). `finish` sends the rest of the final text."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stops: Sequence[str], eod: Optional[int]):
        self.continuation = Continuation(tokenizer, prompt_ids)
        self.stops, self.eod = list(stops), eod
        self.tokens: List[int] = []
        self.sent = ""
        self.stopped = False  # a stop sequence or the end-of-document token ended the text

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        if token == self.eod:
            self.stopped = True
            return ""
        self.tokens.append(token)
        text = self.continuation.text(self.tokens)
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            self.stopped = True
            return self._send(text[: min(hits)])
        return self._send(text[: len(text) - self._held(text)])

    def finish(self, final_text: str) -> str:
        """The rest of `final_text` (the reply's text when not streamed)."""
        return self._send(final_text)

    def _held(self, text: str) -> int:
        held = len(text) - len(text.rstrip("\ufffd"))
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    held = max(held, n)
                    break
        return held

    def _send(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece
