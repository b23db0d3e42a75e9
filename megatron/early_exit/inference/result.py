"""What generation returns, the per-row bookkeeping that fills it, and the clock it is timed by."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

import torch

from megatron.early_exit.inference.sampling import SamplingParams, select_tokens


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


@dataclass
class Transcript:
    """Appends tokens per row and knows which rows are still generating."""

    result: GenerationResult
    max_new_tokens: int
    stop_tokens: frozenset
    sampling: SamplingParams
    generator: Optional[torch.Generator]
    active: List[int] = field(default_factory=list)

    def take(self, out) -> None:
        """Choose each row's token from a decoder step's logits and append it."""
        tokens, logprobs = select_tokens(out.logits, self.sampling, self.generator)
        # One read of the device per step: token ids are exact in float64.
        tokens, logprobs = torch.stack([tokens.double(), logprobs.double()]).tolist()
        for r, t, d, lp in zip(out.rows, tokens, out.depths, logprobs):
            self.append(r, [int(t)], [d], [lp])

    def append(self, row: int, tokens: Iterable[int], depths: Iterable[int], logprobs: Iterable[float]) -> int:
        """Append up to the budget or a stop token; returns how many were appended."""
        res = self.result
        n = 0
        for t, d, lp in zip(tokens, depths, logprobs):
            if self.finished(row):
                break
            res.tokens[row].append(t)
            res.exit_layers[row].append(d)
            res.logprobs[row].append(lp)
            n += 1
        if self.finished(row) and row in self.active:
            self.active.remove(row)
        return n

    def finished(self, row: int) -> bool:
        toks = self.result.tokens[row]
        return len(toks) >= self.max_new_tokens or (bool(toks) and toks[-1] in self.stop_tokens)

    def last_token(self, row: int) -> int:
        return self.result.tokens[row][-1]
