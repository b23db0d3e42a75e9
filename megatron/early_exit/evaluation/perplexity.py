"""Perplexity over a Megatron `.bin/.idx` dataset (tools/preprocess_data.py's output).

The documents are read in order with megatron-core's IndexedDataset, joined into one token
stream (their end-of-document ids included) and cut into windows of `seq_length` tokens;
each window scores its tokens after the first. Perplexity is exp(mean negative
log-likelihood) over every scored token, for each setting on the same windows.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from megatron.early_exit.errors import ConfigError
from megatron.early_exit.evaluation.settings import Setting, combine, needed_layers, score_heads


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    num_tokens: int  # tokens scored
    mean_depth: float  # layers per scored token (early exit: from its confidence)
    greedy_accuracy: float  # fraction of scored tokens that are the argmax


def read_windows(data_path: str, seq_length: int, max_windows: Optional[int] = None) -> List[List[int]]:
    """Consecutive windows of `seq_length` tokens from the dataset at prefix `data_path`."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    missing = [p for p in (data_path + ".bin", data_path + ".idx") if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"--data-path {data_path}: {missing[0]} not found (give the prefix of a .bin/.idx pair)")
    if seq_length < 2:
        raise ConfigError(f"--seq-length {seq_length}: a window needs at least 2 tokens")
    dataset = IndexedDataset(data_path)
    windows, stream = [], []
    for i in range(len(dataset)):
        stream.extend(int(t) for t in dataset[i])
        while len(stream) >= seq_length:
            windows.append(stream[:seq_length])
            stream = stream[seq_length:]
            if max_windows is not None and len(windows) >= max_windows:
                return windows
    if not windows:
        raise ConfigError(f"--data-path {data_path}: fewer than --seq-length {seq_length} tokens in the dataset")
    return windows


def perplexity(
    model,
    windows: List[List[int]],
    settings: Sequence[Setting],
    batch_size: int = 8,
    vocab_size: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> List[PerplexityResult]:
    """Each setting's perplexity over the same windows; each head runs once per batch of
    windows, whatever the number of settings that read it."""
    layers = sorted({layer for s in settings for layer in needed_layers(model, s)})
    sums = [[0.0, 0, 0, 0] for _ in settings]  # nll, tokens, depth, greedy
    start = time.perf_counter()
    for begin in range(0, len(windows), batch_size):
        heads = score_heads(model, windows[begin : begin + batch_size], layers, batch_size, vocab_size)
        for total, setting in zip(sums, settings):
            scores = combine(model, heads, setting)
            for lp, gr, dp in zip(scores.logprobs, scores.greedy, scores.depths):
                total[0] -= sum(lp)
                total[1] += len(lp)
                total[2] += sum(dp)
                total[3] += sum(gr)
        if progress:
            done = min(begin + batch_size, len(windows))
            tokens = sums[0][1]
            progress(
                f"perplexity: {done}/{len(windows)} windows, {len(layers)} heads "
                f"({tokens / (time.perf_counter() - start):.0f} tokens/s scored), "
                + ", ".join(f"{s.name} {math.exp(t[0] / t[1]):.3f}" for s, t in zip(settings, sums))
            )
    return [PerplexityResult(math.exp(nll / n), nll / n, n, depth / n, greedy / n) for nll, n, depth, greedy in sums]
