"""A preallocated per-layer KV cache, written by position and cropped explicitly.

Each layer owns K and V buffers [max_batch, kv_heads / tp, max_seq + 1, head_dim] (the
layout attention reads: each head's keys are contiguous rows, as a fresh tensor's) and,
per row, the length of the prefix whose entries are valid. Layers may disagree: with
early exit by recomputation a token that left at layer d has no entries above d until a
later pass fills them, so deeper layers lag behind shallower ones.

The extra slot at index `max_seq` absorbs the writes of padding entries of a batched
update (rows whose chunk is shorter than the longest one), so that an update never needs
a host-side mask.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self,
        num_layers: int,
        max_batch: int,
        max_seq: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.max_batch, self.max_seq = max_batch, max_seq
        shape = (num_layers, max_batch, num_kv_heads, max_seq + 1, head_dim)
        # One buffer for all layers (each layer's a view), so that state propagation writes
        # the K/V of every layer a token skipped at once (update_layers).
        self.all_k = torch.zeros(shape, dtype=dtype, device=device)
        self.all_v = torch.zeros(shape, dtype=dtype, device=device)
        self.k, self.v = list(self.all_k.unbind(0)), list(self.all_v.unbind(0))
        # Host-side: the decoder schedules work from these, so keeping them as ints
        # avoids a device sync per layer.
        self.lengths: List[List[int]] = [[0] * max_batch for _ in range(num_layers)]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def trash_slot(self) -> int:
        return self.max_seq

    def update(self, layer: int, rows: Tensor, write_pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Write k, v [c, b, kv_heads, head_dim] at (rows[b], write_pos[c, b]).

        Padding entries carry `write_pos == trash_slot`; the caller advances `lengths`.
        """
        batch_index = rows.view(1, -1).expand_as(write_pos)
        self.k[layer][batch_index, :, write_pos] = k  # [c, b] entries, each [kv_heads, head_dim]
        self.v[layer][batch_index, :, write_pos] = v

    def update_layers(self, first: int, rows: Tensor, write_pos: Tensor, k: Tensor, v: Tensor) -> None:
        """`update` of layers first, first + 1, ... at once: k, v [layers, c, b, kv_heads, head_dim]."""
        batch_index = rows.view(1, -1).expand_as(write_pos)
        last = first + k.shape[0]
        # Indices apart from each other put their dims first: the target is [c, b, layers, heads, d].
        self.all_k[first:last, batch_index, :, write_pos] = k.permute(1, 2, 0, 3, 4)
        self.all_v[first:last, batch_index, :, write_pos] = v.permute(1, 2, 0, 3, 4)

    def keys_values(self, layer: int, rows: Tensor, length: int, row_slice: Optional[slice] = None):
        """K and V of `rows` for positions [0, length): [b, kv_heads, length, head_dim] each.

        `row_slice` names the same rows when they are consecutive: then a view, no copy.
        """
        if row_slice is not None:
            return self.k[layer][row_slice, :, :length], self.v[layer][row_slice, :, :length]
        return self.k[layer][rows, :, :length], self.v[layer][rows, :, :length]

    def set_length(self, layer: int, rows: Sequence[int], lengths: Sequence[int]) -> None:
        for r, n in zip(rows, lengths):
            self.lengths[layer][r] = n

    def crop(self, row: int, length: int) -> None:
        """Forget every entry of `row` at positions >= length, in every layer."""
        for per_layer in self.lengths:
            per_layer[row] = min(per_layer[row], length)
