"""Point-to-point communication between adjacent pipeline stages, on any device.

Receives block; sends are asynchronous and waited for at `flush()`. With every
send posted before the matching receive is waited on, the 1F1B pattern (a stage
sends forward while its neighbour sends backward) cannot deadlock, with gloo or
NCCL. Activations keep one shape per run, so no shapes are exchanged.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


class StageLinks:
    def __init__(self, pp_group, shape: Sequence[int], dtype: torch.dtype, device: torch.device):
        ranks = dist.get_process_group_ranks(pp_group)
        index = ranks.index(dist.get_rank())
        self.prev: Optional[int] = ranks[index - 1] if index > 0 else None
        self.next: Optional[int] = ranks[index + 1] if index < len(ranks) - 1 else None
        self.group = pp_group
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self._pending: List[tuple] = []  # (work, tensor kept alive until sent)

    def _recv(self, peer: int) -> torch.Tensor:
        buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        dist.irecv(buffer, src=peer, group=self.group).wait()
        return buffer

    def _send(self, tensor: torch.Tensor, peer: int) -> None:
        tensor = tensor.detach().contiguous()
        if tuple(tensor.shape) != self.shape:
            raise RuntimeError(f"pipeline send of shape {tuple(tensor.shape)}, expected {self.shape}")
        self._pending.append((dist.isend(tensor, dst=peer, group=self.group), tensor))

    def recv_forward(self) -> torch.Tensor:
        return self._recv(self.prev)

    def send_forward(self, tensor: torch.Tensor) -> None:
        self._send(tensor, self.next)

    def recv_backward(self) -> torch.Tensor:
        return self._recv(self.next)

    def send_backward(self, tensor: torch.Tensor) -> None:
        self._send(tensor, self.prev)

    def flush(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
