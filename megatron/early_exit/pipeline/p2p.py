"""Point-to-point communication between pipeline stages, on any device, for training and
inference.

`Transport` is the one layer that talks to torch.distributed: it posts a rank's operations
with their tensors, keeps the tensors alive until the operations are waited for, waits
for the ones asked for and counts what is in flight. Its users keep only their framing:

    StageLinks            training: activations and gradients of one fixed shape
    inference/pipeline.py _Links: step headers, hidden states, decisions and logits

NCCL completes a send only once the peer has posted the matching receive, and runs a
stage's operations in issue order, so a stage that sends and then blocks on a receive
waits for a peer doing the same the other way round (1F1B: stage 0 sends F1 and waits
for B0 while stage 1 sends B0 and waits for F1). Training therefore posts every exchange
through `torch.distributed.batch_isend_irecv`: a send and the receives the schedule needs
next are posted as one batch (`plan.executor_steps` says which), as Megatron-LM's
send_forward_recv_backward does. A batch of sends alone stays in flight until a later
wait or `flush()`. Gloo runs the same batches op by op. Activations keep one shape per
run, so no shapes are exchanged. Inference posts plain isend/irecv, one op at a time
(one NCCL stream per pair of ranks); its message order is what keeps it deadlock free.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.early_exit.pipeline.plan import Op, Post


class Transport:
    """A rank's posted point-to-point operations, each `Op` carrying one tensor (a send's
    data, a receive's buffer). `ranks[peer]` is the global rank of stage `peer`.

    batched: each post is one `batch_isend_irecv` call over `group`; otherwise every op is
    its own isend/irecv (on the default group when `group` is None)."""

    def __init__(self, ranks: Sequence[int], group=None, batched: bool = True):
        self.ranks, self.group, self.batched = list(ranks), group, batched
        self._posted: List[Tuple[Tuple[Op, ...], list, Tuple[torch.Tensor, ...]]] = []  # (ops, works, tensors)
        self.peak = 0  # most ops ever in flight at once

    def post(self, ops: Sequence[Op], tensors: Sequence[torch.Tensor], tag: int = 0) -> None:
        if self.batched:
            p2p = [
                dist.P2POp(dist.isend if op.send else dist.irecv, tensor, self.ranks[op.peer], self.group, tag)
                for op, tensor in zip(ops, tensors)
            ]
            self._posted.append((tuple(ops), dist.batch_isend_irecv(p2p), tuple(tensors)))
        else:
            for op, tensor in zip(ops, tensors):
                call = dist.isend if op.send else dist.irecv
                self._posted.append(((op,), [call(tensor, self.ranks[op.peer], group=self.group, tag=tag)], (tensor,)))
        self.peak = max(self.peak, self.in_flight)

    def wait(self, ops: Sequence[Op], earlier: bool = False) -> Dict[Op, torch.Tensor]:
        """Wait for the posts holding `ops` (with `earlier`, for every post before them too:
        one stream runs them in that order anyway); returns the tensors of the ops waited for."""
        wanted = set(ops)
        held = [i for i, (batch, _, _) in enumerate(self._posted) if wanted & set(batch)]
        chosen = list(range(held[-1] + 1)) if earlier and held else held
        tensors: Dict[Op, torch.Tensor] = {}
        for i in chosen:
            batch, works, kept = self._posted[i]
            for work in works:
                work.wait()
            tensors.update(zip(batch, kept))
        for i in reversed(chosen):
            del self._posted[i]
        return tensors

    def wait_all(self) -> None:
        for _, works, _ in self._posted:
            for work in works:
                work.wait()
        self._posted.clear()

    @property
    def in_flight(self) -> int:
        """Ops posted and not yet waited for."""
        return sum(len(batch) for batch, _, _ in self._posted)


class StageLinks:
    """Training's links: every message one tensor of `shape`, posted in batches."""

    def __init__(self, pp_group, shape: Sequence[int], dtype: torch.dtype, device: torch.device):
        ranks = dist.get_process_group_ranks(pp_group)
        self.stage = ranks.index(dist.get_rank())
        self.transport = Transport(ranks, pp_group, batched=True)
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self._received: Dict[tuple, torch.Tensor] = {}  # message -> buffer of a posted receive

    def post(self, post: Post, tensor=None) -> None:
        """Post a batch; its one send (if any) carries `tensor`; several sends take theirs
        from `tensor` as a dict by message."""
        if not post.ops:
            return
        tensors = []
        for op in post.ops:
            if op.send:
                buffer = (tensor[op.message] if isinstance(tensor, dict) else tensor).detach().contiguous()
                if tuple(buffer.shape) != self.shape:
                    raise RuntimeError(f"pipeline send of shape {tuple(buffer.shape)}, expected {self.shape}")
            else:
                buffer = self._received[op.message] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            tensors.append(buffer)
        self.transport.post(post.ops, tensors)

    def wait(self, ops: Sequence[Op]) -> None:
        """Wait for the batches holding `ops` and every batch posted before them."""
        self.transport.wait(ops, earlier=True)

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
        self.transport.wait_all()

    @property
    def in_flight(self) -> int:
        """Ops posted and not yet waited for."""
        return self.transport.in_flight
