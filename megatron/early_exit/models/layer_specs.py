"""Layer specs: megatron-core's own, chosen from the target device, plus a CPU stand-in.

Three implementations (Megatron-LM's `--transformer-impl`, plus one for tests):
  local               megatron-core's local spec with `TorchNorm` below: its fallback
                      norm `WrappedTorchNorm` refuses sequence parallelism
                      (torch_norm.py:32) only because it cannot mark its parameters
  transformer_engine  megatron-core's TE spec (needs TE and a CUDA target device)
  te_standin          TE's module layout in plain PyTorch (te_layout.py), for CPU tests

The choice rides on `TransformerConfig.transformer_impl`. megatron-core's default there
is "transformer_engine"; read as "TE where usable", it gives TE only when the target
device (the one `initialize_parallel` set up) is CUDA and TE imports, else local.
Checkpoints do not depend on the choice: the layers' sharded keys are TE's in both
(megatron-core maps the local norms onto them) and exit heads own the same tensors.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron.early_exit.errors import ConfigError
from megatron.early_exit.models.te_layout import (
    LayerNormColumnParallelLinear,
    fused_norm,
    has_fused_norm,
    te_layout_layer_spec,
)

LOCAL, TRANSFORMER_ENGINE, TE_STANDIN = "local", "transformer_engine", "te_standin"
TRANSFORMER_IMPLS = (LOCAL, TRANSFORMER_ENGINE, TE_STANDIN)


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


def transformer_engine_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def transformer_engine_available(device: Optional[torch.device] = None) -> bool:
    """TE can run the model: it imports and the target device (default: this process's,
    see parallel.target_device) is CUDA."""
    from megatron.early_exit.parallel import target_device

    device = torch.device(device) if device is not None else target_device()
    return device.type == "cuda" and transformer_engine_importable()


def resolve_transformer_impl(requested: Optional[str], device: Optional[torch.device]) -> str:
    """`--transformer-impl` for a model on `device` (default: this process's target device):
    None/"auto" picks TE only when it can run there; an explicit transformer_engine it
    cannot use is refused."""
    if device is None:
        from megatron.early_exit.parallel import target_device

        device = target_device()
    if requested in (None, "auto"):
        return TRANSFORMER_ENGINE if transformer_engine_available(device) else LOCAL
    if requested not in TRANSFORMER_IMPLS:
        raise ConfigError(f"--transformer-impl must be one of {', '.join(TRANSFORMER_IMPLS)}, got {requested!r}")
    if requested == TRANSFORMER_ENGINE:
        if torch.device(device).type != "cuda":
            raise ConfigError(
                f"--transformer-impl transformer_engine needs a CUDA device, but the model runs on "
                f"{torch.device(device).type}; use --transformer-impl local"
            )
        if not transformer_engine_importable():
            raise ConfigError(
                "--transformer-impl transformer_engine: Transformer Engine is not installed "
                "(pip install the `gpu` extra) or does not import; use --transformer-impl local"
            )
    return requested


def model_impl(config: TransformerConfig) -> str:
    """The implementation a model of `config` is built with."""
    impl = getattr(config, "transformer_impl", TRANSFORMER_ENGINE)
    if impl == TRANSFORMER_ENGINE:
        return TRANSFORMER_ENGINE if transformer_engine_available() else LOCAL
    if impl not in TRANSFORMER_IMPLS:
        raise ConfigError(f"transformer_impl {impl!r} is not supported here; use one of {', '.join(TRANSFORMER_IMPLS)}")
    return impl


def choose_impl(config: Optional[TransformerConfig], use_te: Optional[bool], impl: Optional[str]) -> str:
    """The implementation to build: an explicit `impl`, else `use_te` (True/False), else
    the config's choice."""
    if impl is None and use_te is not None:
        impl = TRANSFORMER_ENGINE if use_te else LOCAL
    if impl is None:
        return model_impl(config) if config is not None else resolve_transformer_impl(None, None)
    if impl not in TRANSFORMER_IMPLS:
        raise ConfigError(f"transformer_impl {impl!r} is not supported here; use one of {', '.join(TRANSFORMER_IMPLS)}")
    if impl == TRANSFORMER_ENGINE and not transformer_engine_importable():
        raise ConfigError("the Transformer Engine spec was asked for, but Transformer Engine does not import")
    return impl


def _local_layer_spec(config: TransformerConfig) -> ModuleSpec:
    from megatron.core.models.gpt import gpt_layer_specs

    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        normalization=config.normalization, qk_layernorm=config.qk_layernorm
    )
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    if config.qk_layernorm:  # megatron-core's choice there is WrappedTorchNorm too
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = TorchNorm
    return spec


def get_layer_spec(
    config: TransformerConfig, use_te: Optional[bool] = None, impl: Optional[str] = None, document_mask: bool = False
) -> ModuleSpec:
    """The spec of one transformer layer. `document_mask` (--reset-attention-mask): attention
    takes the batch's mask as given; the causal kernels (apex's fused softmax, TE's causal
    mask type) would silently drop the document boundaries it holds."""
    impl = choose_impl(config, use_te, impl)
    if impl == TRANSFORMER_ENGINE:
        from megatron.core.models.gpt import gpt_layer_specs

        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    else:
        spec = _local_layer_spec(config)
        spec = te_layout_layer_spec(spec) if impl == TE_STANDIN else spec
    if document_mask:
        from megatron.core.transformer.enums import AttnMaskType

        spec = copy.deepcopy(spec)
        attention = spec.submodules.self_attention
        attention.params = {**attention.params, "attn_mask_type": AttnMaskType.arbitrary}
    return spec


def get_norm_spec(use_te: Optional[bool] = None, impl: Optional[str] = None):
    """The norm used outside layers (final norm, exit norms)."""
    if choose_impl(None, use_te, impl) == TRANSFORMER_ENGINE:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return TorchNorm


def get_exit_mlp_spec(layer_spec: ModuleSpec) -> ModuleSpec:
    """The layer's MLP without a norm fused into fc1: an exit MLP applies its layer's own
    pre-MLP norm (`pre_mlp_norm`), so it owns the same tensors in every layout."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    mlp = copy.deepcopy(layer_spec.submodules.mlp)
    fc1 = mlp.submodules.linear_fc1
    if fc1 is LayerNormColumnParallelLinear:
        mlp.submodules.linear_fc1 = ColumnParallelLinear
    elif getattr(fc1, "__name__", "") == "TELayerNormColumnParallelLinear":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

        mlp.submodules.linear_fc1 = TEColumnParallelLinear
    return mlp


def pre_mlp_norm(layer):
    """The callable that is `layer`'s pre-MLP norm: its `pre_mlp_layernorm` (local), or the
    norm fused into its `mlp.linear_fc1` (TE layout)."""
    if not isinstance(layer.pre_mlp_layernorm, IdentityOp):
        return layer.pre_mlp_layernorm
    fc1 = getattr(getattr(layer, "mlp", None), "linear_fc1", None)
    if fc1 is not None and has_fused_norm(fc1):
        return lambda x: fused_norm(fc1, x)
    return layer.pre_mlp_layernorm


def get_block_spec(
    config: TransformerConfig,
    num_layers: int,
    use_te: Optional[bool] = None,
    impl: Optional[str] = None,
    document_mask: bool = False,
) -> TransformerBlockSubmodules:
    """Spec of a block of `num_layers` layers (this pipeline stage's) with our final norm."""
    impl = choose_impl(config, use_te, impl)
    layer = get_layer_spec(config, impl=impl, document_mask=document_mask)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=get_norm_spec(impl=impl))
