"""Choosing the next token from full-vocabulary logits: greedy, or sampled with
temperature, top-k and top-p from a seeded generator.

Under tensor parallelism every rank holds the same gathered logits and a generator with
the same seed, so every rank draws the same token without communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from megatron.early_exit.inference.errors import InferenceConfigError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0 picks the most likely token (greedy); > 0 samples from softmax(logits / temperature)."""

    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""

    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches top_p (1: all)."""

    seed: Optional[int] = None
    """Seed of the sampling generator (None: drawn from torch's default generator)."""

    ban_after: Tuple[Tuple[int, int], ...] = ()
    """(previous, banned) token pairs: `banned` is never chosen right after `previous`
    (Megatron-LM's prevent_newline_after_colon: no newline right after a colon)."""

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InferenceConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InferenceConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InferenceConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    def banned(self, previous, vocab: int, device) -> Optional[Tensor]:
        """[b, V] bool: the tokens each row may not choose after its `previous` token (None: none)."""
        if not self.ban_after:
            return None
        mask = torch.zeros(len(previous), vocab, dtype=torch.bool)
        for i, prev in enumerate(previous):
            for after, banned in self.ban_after:
                if prev == after and 0 <= banned < vocab:
                    mask[i, banned] = True
        return mask.to(device) if mask.any() else None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def make_generator(self, device) -> Optional[torch.Generator]:
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return torch.Generator(device=device).manual_seed(seed)

    def make_generators(self, device, rows: int) -> List[Optional[torch.Generator]]:
        """One generator per row, row r seeded `seed + r`: a row samples what it samples
        alone with that seed, whatever the rows beside it (in a batch or a continuous one)."""
        if self.greedy:
            return [None] * rows
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return [torch.Generator(device=device).manual_seed(seed + r) for r in range(rows)]


def _filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first one stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def select_tokens(
    logits: Tensor, params: SamplingParams, generator: Optional[torch.Generator], banned: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """logits [b, V] -> (tokens [b], log-probabilities [b] of those tokens under the
    layer's own distribution, before temperature and filtering). `banned` [b, V] (bool)
    marks tokens a row may not choose (their log-probabilities are still reported)."""
    logits = logits.float()
    allowed = logits if banned is None else logits.masked_fill(banned, float("-inf"))
    if params.greedy:
        tokens = allowed.argmax(dim=-1)
    else:
        filtered = _filter_top_k_top_p(allowed / params.temperature, params.top_k, params.top_p)
        tokens = torch.multinomial(filtered.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, logprobs


def select_row_tokens(
    logits: Tensor,
    params: SamplingParams,
    generators: Sequence[Optional[torch.Generator]],
    banned: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """select_tokens for rows that each sample from their own generator (greedy rows: at once)."""
    if params.greedy:
        return select_tokens(logits, params, None, banned)
    picks = [
        select_tokens(logits[i : i + 1], params, g, None if banned is None else banned[i : i + 1])
        for i, g in enumerate(generators)
    ]
    return torch.cat([t for t, _ in picks]), torch.cat([lp for _, lp in picks])


def top_alternatives(logits: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """logits [b, V] -> the n likeliest token ids [b, n] and their log-probabilities, best first."""
    top = torch.log_softmax(logits.float(), dim=-1).topk(min(n, logits.shape[-1]), dim=-1)
    return top.indices, top.values
