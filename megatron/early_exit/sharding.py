"""Move tensors between their full (TP=1) form and this rank's tensor-parallel shard.

megatron-core marks each tensor-parallel parameter with `tensor_model_parallel`,
`partition_dim` and `partition_stride`. A SwiGLU `linear_fc1` holds [gate; up]
per rank, so its full form is [gate_0..gate_n; up_0..up_n], not a plain concat.
Used for layout-invariant initialisation, tests against single-process
references, and checkpoint conversion.
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch
from megatron.core import parallel_state


def _is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _num_chunks(name: str, gated: bool) -> int:
    """How many independently split blocks a tensor is made of (2 for SwiGLU fc1)."""
    return 2 if gated and name.endswith(("linear_fc1.weight", "linear_fc1.bias")) else 1


def shard_full_tensor(
    full: torch.Tensor, param: torch.Tensor, name: str, gated: bool, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """Cut this rank's shard out of a full tensor, matching `param`'s layout."""
    if not _is_tp_sharded(param) or tp_size == 1:
        return full
    dim = param.partition_dim
    blocks = full.chunk(_num_chunks(name, gated), dim=dim)
    return torch.cat([b.chunk(tp_size, dim=dim)[tp_rank] for b in blocks], dim=dim)


def gather_full_tensor(local: torch.Tensor, param: torch.Tensor, name: str, gated: bool) -> torch.Tensor:
    """Reassemble the full tensor from every TP rank's shard (a collective on the TP group)."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if not _is_tp_sharded(param) or tp_size == 1:
        return local.detach().clone()
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(tp_size)]
    torch.distributed.all_gather(parts, local.detach().contiguous(), group=group)
    dim = param.partition_dim
    nblocks = _num_chunks(name, gated)
    per_rank_blocks = [p.chunk(nblocks, dim=dim) for p in parts]
    return torch.cat([torch.cat([blocks[b] for blocks in per_rank_blocks], dim=dim) for b in range(nblocks)], dim=dim)


def _named(model: torch.nn.Module) -> Iterable[Tuple[str, torch.nn.Parameter]]:
    return model.named_parameters()


def full_state_dict(model: torch.nn.Module, grads: bool = False, gated: bool | None = None) -> Dict[str, torch.Tensor]:
    """Full parameters (or their gradients, read from `main_grad` under DDP) of this rank's model."""
    if gated is None:
        gated = bool(getattr(getattr(model, "config", None), "gated_linear_unit", False))
    out = {}
    for name, param in _named(model):
        if grads:
            local = getattr(param, "main_grad", None)
            if local is None:
                local = param.grad
            if local is None:
                continue
        else:
            local = param.data
        out[_strip_wrapper(name)] = gather_full_tensor(local, param, name, gated)
    return out


def _strip_wrapper(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name
