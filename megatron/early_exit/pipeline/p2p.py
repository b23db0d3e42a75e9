"""Point-to-point communication between adjacent pipeline stages, on any device.

NCCL completes a send only once the peer has posted the matching receive, and runs a
stage's operations in issue order, so a stage that sends and then blocks on a receive
waits for a peer doing the same the other way round (1F1B: stage 0 sends F1 and waits
for B0 while stage 1 sends B0 and waits for F1). Every exchange therefore goes through
`torch.distributed.batch_isend_irecv`: a send and the receives the schedule needs next
are posted as one batch (`plan.executor_steps` says which), as Megatron-LM's
send_forward_recv_backward does. A batch of sends alone stays in flight until a later
wait or `flush()`. Gloo runs the same batches op by op. Activations keep one shape per
run, so no shapes are exchanged.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.early_exit.pipeline.plan import Op, Post


class StageLinks:
    def __init__(self, pp_group, shape: Sequence[int], dtype: torch.dtype, device: torch.device):
        self.ranks = dist.get_process_group_ranks(pp_group)
        self.stage = self.ranks.index(dist.get_rank())
        self.group = pp_group
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self._in_flight: List[Tuple[Tuple[Op, ...], list, list]] = []  # (ops, works, tensors kept alive)
        self._received: Dict[tuple, torch.Tensor] = {}  # message -> buffer of a posted receive

    def post(self, post: Post, tensor: Optional[torch.Tensor] = None) -> None:
        """Post a batch; its one send (if any) carries `tensor`."""
        if not post.ops:
            return
        p2p, tensors = [], []
        for op in post.ops:
            if op.send:
                buffer = tensor.detach().contiguous()
                if tuple(buffer.shape) != self.shape:
                    raise RuntimeError(f"pipeline send of shape {tuple(buffer.shape)}, expected {self.shape}")
                p2p.append(dist.P2POp(dist.isend, buffer, self.ranks[op.peer], self.group))
            else:
                buffer = self._received[op.message] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                p2p.append(dist.P2POp(dist.irecv, buffer, self.ranks[op.peer], self.group))
            tensors.append(buffer)
        self._in_flight.append((post.ops, dist.batch_isend_irecv(p2p), tensors))

    def wait(self, ops: Sequence[Op]) -> None:
        """Wait for the batches holding `ops` and every batch posted before them: one
        stream runs them in that order anyway."""
        wanted = set(ops)
        last = max((i for i, (batch, _, _) in enumerate(self._in_flight) if wanted & set(batch)), default=-1)
        for _, works, _ in self._in_flight[: last + 1]:
            for work in works:
                work.wait()
        del self._in_flight[: last + 1]

    def take(self, message: tuple) -> torch.Tensor:
        """The buffer of a received (and waited for) message."""
        return self._received.pop(message)

    def _exchange(self, op: Op, tensor: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        self.post(Post((op,)), tensor)
        if op.send:
            return None
        self.wait([op])
        return self.take(op.message)

    # One message at a time, for a single forward pass (no schedule to pair them with).
    def recv_forward(self) -> torch.Tensor:
        return self._exchange(Op(False, self.stage - 1, ("F", None)))

    def send_forward(self, tensor: torch.Tensor) -> None:
        self._exchange(Op(True, self.stage + 1, ("F", None)), tensor)

    def recv_backward(self) -> torch.Tensor:
        return self._exchange(Op(False, self.stage + 1, ("B", None)))

    def send_backward(self, tensor: torch.Tensor) -> None:
        self._exchange(Op(True, self.stage - 1, ("B", None)), tensor)

    def flush(self) -> None:
        for _, works, _ in self._in_flight:
            for work in works:
                work.wait()
        self._in_flight.clear()

    @property
    def in_flight(self) -> int:
        """Batches posted and not yet waited for."""
        return len(self._in_flight)
