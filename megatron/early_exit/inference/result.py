"""What generation returns, the per-row bookkeeping that fills it, and the clock it is timed by."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from megatron.early_exit.inference.sampling import SamplingParams, select_row_tokens, top_alternatives


def clock(device) -> float:
    """Seconds, once the work queued on `device` is done (so that timings include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class GenerationResult:
    tokens: List[List[int]]  # generated tokens per prompt (a stop token, when hit, is the last)
    exit_layers: List[List[int]]  # layers each token went through (num_layers: full depth)
    logprobs: List[List[float]]  # log-probability of each token under the layer that produced it
    num_layers: int
    strategy: str = ""
    prefill_seconds: float = 0.0  # the prompts and the first token of each (always full depth)
    decode_seconds: float = 0.0  # every later token
    decode_cpu_seconds: float = 0.0  # the same, in this process's CPU time
    num_steps: int = 0  # batched decoder passes after the prefill (drafts and verifications included)
    num_drafted: int = 0  # self-speculative: tokens drafted, and how many the full model accepted
    num_accepted: int = 0
    # With top_n > 0: per token, the top_n likeliest ids under the layer that produced it,
    # best first, and their log-probabilities (None when not asked for).
    top_tokens: Optional[List[List[List[int]]]] = None
    top_logprobs: Optional[List[List[List[float]]]] = None

    @property
    def num_generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def num_decoded(self) -> int:
        """Tokens produced after the prefill (the ones `decode_seconds` pays for)."""
        return sum(max(len(t) - 1, 0) for t in self.tokens)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.num_decoded / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def mean_exit_layer(self) -> float:
        """Mean depth of the decoded tokens (the prefill's first tokens are always full depth)."""
        depths = [d for per_row in self.exit_layers for d in per_row[1:]]
        return sum(depths) / len(depths) if depths else float(self.num_layers)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0


@dataclass(frozen=True)
class TokenEvent:
    """Tokens just appended to one row (what `generate(on_tokens=...)` is called with)."""

    row: int
    tokens: List[int]
    exit_layers: List[int]
    logprobs: List[float]
    top_tokens: Optional[List[List[int]]] = None  # with top_n > 0
    top_logprobs: Optional[List[List[float]]] = None
    finished: bool = False  # the row hit its budget or a stop token


TokenCallback = Callable[[TokenEvent], None]


@dataclass
class Transcript:
    """Appends tokens per row and knows which rows are still generating."""

    result: GenerationResult
    max_new_tokens: int
    stop_tokens: frozenset
    sampling: SamplingParams
    generators: List[Optional[torch.Generator]]  # per row (SamplingParams.make_generators)
    active: List[int] = field(default_factory=list)
    top_n: int = 0  # alternatives kept per token
    on_tokens: Optional[TokenCallback] = None  # called as tokens are appended, per row
    previous: Optional[List[int]] = None  # each row's newest token (its prompt's last at first)
    cancelled: Optional[Callable[[], Iterable[int]]] = None  # rows whose caller went away, asked each step
    # Called between two rounds of a decode that runs in rounds (self-speculation): the
    # server's continuous batch steps there, so a long request does not stall the others.
    between_rounds: Optional[Callable[[], None]] = None

    def __post_init__(self):
        if self.top_n > 0:
            rows = len(self.result.tokens)
            self.result.top_tokens = [[] for _ in range(rows)]
            self.result.top_logprobs = [[] for _ in range(rows)]

    def take(self, out) -> None:
        """Choose each row's token from a decoder step's logits and append it."""
        banned = None
        if self.sampling.ban_after and self.previous is not None:
            banned = self.sampling.banned([self.previous[r] for r in out.rows], out.logits.shape[-1], out.logits.device)
        tokens, logprobs = select_row_tokens(out.logits, self.sampling, [self.generators[r] for r in out.rows], banned)
        columns = [tokens.double().unsqueeze(-1), logprobs.double().unsqueeze(-1)]
        if self.top_n > 0:
            columns += [t.double() for t in top_alternatives(out.logits, self.top_n)]
        # One read of the device per step: token ids are exact in float64.
        rows = torch.cat(columns, dim=-1).tolist()
        n = self.top_n
        for r, d, values in zip(out.rows, out.depths, rows):
            top = ([[int(t) for t in values[2 : 2 + n]]], [values[2 + n :]]) if n > 0 else (None, None)
            self.append(r, [int(values[0])], [d], [values[1]], *top)

    def append(
        self,
        row: int,
        tokens: Iterable[int],
        depths: Iterable[int],
        logprobs: Iterable[float],
        top_tokens: Optional[Sequence[Sequence[int]]] = None,
        top_logprobs: Optional[Sequence[Sequence[float]]] = None,
    ) -> int:
        """Append up to the budget or a stop token; returns how many were appended."""
        res = self.result
        start = len(res.tokens[row])
        for t, d, lp in zip(tokens, depths, logprobs):
            if self.finished(row):
                break
            res.tokens[row].append(t)
            res.exit_layers[row].append(d)
            res.logprobs[row].append(lp)
        n = len(res.tokens[row]) - start
        if self.top_n > 0:
            # A caller that has no alternatives leaves empty lists, still aligned with `tokens`.
            res.top_tokens[row].extend([list(t) for t in (top_tokens or [[]] * n)[:n]])
            res.top_logprobs[row].extend([list(v) for v in (top_logprobs or [[]] * n)[:n]])
        if n and self.previous is not None:
            self.previous[row] = res.tokens[row][-1]
        if self.finished(row) and row in self.active:
            self.active.remove(row)
        if n and self.on_tokens is not None:
            self.on_tokens(self._event(row, start))
        return n

    def _event(self, row: int, start: int) -> TokenEvent:
        res = self.result
        top = (res.top_tokens[row][start:], res.top_logprobs[row][start:]) if self.top_n > 0 else (None, None)
        return TokenEvent(
            row,
            res.tokens[row][start:],
            res.exit_layers[row][start:],
            res.logprobs[row][start:],
            *top,
            finished=self.finished(row),
        )

    def going(self) -> bool:
        """Whether a row is still generating, once the rows whose caller left are dropped
        (the same answer on every tensor-parallel rank: `cancelled` is rank 0's)."""
        if self.cancelled is not None and self.active:
            gone = set(self.cancelled())
            if gone:
                self.active = [r for r in self.active if r not in gone]
        return bool(self.active)

    def finished(self, row: int) -> bool:
        toks = self.result.tokens[row]
        return len(toks) >= self.max_new_tokens or (bool(toks) and toks[-1] in self.stop_tokens)

    def last_token(self, row: int) -> int:
        return self.result.tokens[row][-1]
