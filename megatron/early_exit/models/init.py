"""Layout-invariant initialisation: the same seed gives the same weights for any TP/PP/DP.

Each weight matrix is drawn in full from a generator seeded by the run's seed and
the parameter's canonical name (global layer numbers, see `canonical_name`), then
this rank's tensor-parallel shard is cut out. Runs with different layouts can then
be compared step by step, which is how users and tests check a layout.
Vectors (norm weights, biases) keep their constant construction values.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state

from megatron.early_exit.sharding import shard_full_tensor

_LAYER = re.compile(r"^(?:module\.)*decoder\.layers\.(\d+)\.")
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def canonical_name(model: torch.nn.Module, name: str) -> str:
    """Parameter name with the stage-local layer index replaced by the global one."""
    while name.startswith("module."):
        name = name[len("module.") :]
    match = _LAYER.match(name)
    if not match:
        return name
    layers = _unwrap(model).decoder.layers
    global_index = layers[int(match.group(1))].layer_number - 1
    return f"decoder.layers.{global_index}." + name[match.end() :]


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _full_shape(param: torch.Tensor, tp_size: int):
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


def _seed_for(seed: int, key: str) -> int:
    return zlib.crc32(f"{seed}:{key}".encode())


@torch.no_grad()
def initialize_layout_invariant(model: torch.nn.Module, seed: int, init_method_std: float, num_layers: int) -> None:
    """Re-draw every weight matrix of `model` (one pipeline stage, TP-sharded)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    config = getattr(_unwrap(model), "config", None)
    gated = bool(getattr(config, "gated_linear_unit", False))
    # megatron-core's rule: projections back into the residual stream get std/sqrt(2L).
    std_out = init_method_std / math.sqrt(2.0 * num_layers)
    for name, param in model.named_parameters():
        if param.ndim < 2:
            continue
        key = canonical_name(model, name)
        # Copies of the word embedding on later pipeline stages (tied output layer,
        # tied exits) start equal to it.
        if getattr(param, "shared_embedding", False):
            key = "embedding.word_embeddings.weight"
        std = std_out if key.endswith(_OUTPUT_PROJECTIONS) else init_method_std
        generator = torch.Generator().manual_seed(_seed_for(seed, key))
        full = torch.empty(_full_shape(param, tp_size), dtype=torch.float32).normal_(0.0, std, generator=generator)
        param.copy_(shard_full_tensor(full, param, name, gated, tp_rank, tp_size).to(param.dtype))
