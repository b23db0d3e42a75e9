"""Layer specs: megatron-core's own, with a norm that works under sequence parallelism.

On CPU (or whenever Transformer Engine is missing) we use megatron-core's local
spec. Its fallback norm `WrappedTorchNorm` refuses sequence parallelism
(torch_norm.py:32) only because it cannot mark its parameters: `TorchNorm`
below does, so `finalize_model_grads` all-reduces their gradients over TP.
"""

from __future__ import annotations

import torch

from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules


class TorchNorm:
    """LayerNorm or RMSNorm from torch.nn, as the config says, SP-aware."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"--normalization must be LayerNorm or RMSNorm, got {config.normalization!r}")
        for param in norm.parameters():
            # Each TP rank sees a different slice of the sequence under SP, so the
            # gradients of replicated norm weights must be summed over TP.
            param.sequence_parallel = config.sequence_parallel
        return norm


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def get_layer_spec(config: TransformerConfig, use_te: bool | None = None) -> ModuleSpec:
    """The spec of one transformer layer: Transformer Engine's when usable, else local."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=config.qk_layernorm
        )
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        normalization=config.normalization, qk_layernorm=config.qk_layernorm
    )
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    return spec


def get_norm_spec(use_te: bool | None = None):
    """The norm used outside layers (final norm, exit norms)."""
    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return TorchNorm


def get_block_spec(config: TransformerConfig, num_layers: int, use_te: bool | None = None) -> TransformerBlockSubmodules:
    """Spec of a block of `num_layers` layers (this pipeline stage's) with our final norm."""
    layer = get_layer_spec(config, use_te)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=get_norm_spec(use_te))
