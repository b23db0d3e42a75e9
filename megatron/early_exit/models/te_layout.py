"""Transformer Engine's module layout in plain PyTorch: a CPU stand-in for the TE spec.

Under megatron-core's TE spec a layer has no norm modules of its own (`input_layernorm`
and `pre_mlp_layernorm` are `IdentityOp`): the input norm lives inside `linear_qkv` and
the pre-MLP norm inside `mlp.linear_fc1` (TELayerNormColumnParallelLinear, parameters
`layer_norm_weight` and, for LayerNorm, `layer_norm_bias`), and core attention carries
TE's `_extra_state` in its state dict but not in its sharded state dict. Code that
reaches into layer modules meets that layout on GPU hosts only; this spec gives it on
CPU, computing exactly what the local spec computes with the same weights.

`fused_norm` applies the norm held by such a linear (the stand-in's or TE's own), so
that exit heads can apply their layer's pre-MLP norm whatever the layout.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec


def fused_norm(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm a TE-style LayerNorm-linear applies to its input, on its own.

    Reads the attributes TE's LayerNormLinear keeps (`normalization`, `eps`,
    `zero_centered_gamma`, `layer_norm_weight`, `layer_norm_bias`); with the stand-in's
    parameters it is the same function torch.nn.LayerNorm / RMSNorm compute."""
    weight = linear.layer_norm_weight
    if getattr(linear, "zero_centered_gamma", False):
        weight = weight + 1
    shape = (weight.shape[0],)
    if linear.normalization == "RMSNorm":
        return F.rms_norm(x, shape, weight, linear.eps)
    return F.layer_norm(x, shape, weight, linear.layer_norm_bias, linear.eps)


def has_fused_norm(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "layer_norm_weight", None), torch.Tensor)


class LayerNormColumnParallelLinear(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear with the preceding norm fused in, as TE's
    TELayerNormColumnParallelLinear: same parameter names, same forward contract."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"--normalization must be LayerNorm or RMSNorm, got {config.normalization!r}")
        self.normalization = config.normalization
        self.eps = config.layernorm_epsilon
        self.zero_centered_gamma = False  # as the local spec's TorchNorm, which has no such option
        own = dict(self._parameters)
        self._parameters.clear()
        # TE's LayerNormLinear registers the norm's parameters before the weight: the
        # same parameter order as TE (DDP buckets, the gradient-norm sum follow it).
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        if self.normalization == "LayerNorm":
            self.layer_norm_bias = torch.nn.Parameter(torch.zeros(input_size, dtype=config.params_dtype))
        else:
            self.layer_norm_bias = None
        self._parameters.update(own)
        for param in (self.layer_norm_weight, self.layer_norm_bias):
            if param is not None:
                # Under SP each TP rank normalises other tokens: sum these grads over TP.
                param.sequence_parallel = config.sequence_parallel

    def forward(self, input_, weight=None, runtime_gather_output=None):
        return super().forward(fused_norm(self, input_), weight=weight, runtime_gather_output=runtime_gather_output)


class ExtraStateDotProductAttention(DotProductAttention):
    """megatron-core's DotProductAttention with TE's `_extra_state` (empty, as TE keeps
    it without FP8). The inherited sharded state dict leaves it out, as TE's does."""

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        pass


def te_layout_layer_spec(local_spec: ModuleSpec) -> ModuleSpec:
    """The TE module layout built from our local layer spec (same modules otherwise)."""
    spec = copy.deepcopy(local_spec)
    layer = spec.submodules
    layer.input_layernorm = IdentityOp
    layer.pre_mlp_layernorm = IdentityOp
    layer.self_attention.submodules.linear_qkv = LayerNormColumnParallelLinear
    layer.self_attention.submodules.core_attention = ExtraStateDotProductAttention
    layer.mlp.submodules.linear_fc1 = LayerNormColumnParallelLinear
    # The parameters already carry TE's names; the local spec's renaming would not apply.
    layer.sharded_state_dict_keys_map = {}
    return spec
