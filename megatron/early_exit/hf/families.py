"""The Hugging Face model families that convert, each a small description.

All of them are a Llama decoder (RMSNorm, SwiGLU, RoPE, no linear biases, optional
grouped-query attention and explicit head_dim); a family says what it adds on top and
what it refuses:

  llama    LlamaForCausalLM      (Llama 2, Llama 3.x)   attention_bias/mlp_bias refused
  mistral  MistralForCausalLM    (v0.2+, Nemo)           sliding_window below the context refused
  qwen2    Qwen2ForCausalLM      (Qwen2, Qwen2.5)        + q/k/v biases (--add-qkv-bias)
  qwen3    Qwen3ForCausalLM      (Qwen3 dense)           + per-head q/k RMSNorm (--qk-layernorm)

The extra weights map onto megatron-core's (mapping.LAYER_KEYS names the rest):
  self_attention.linear_qkv.bias         <- self_attn.{q,k,v}_proj.bias (merged per query group)
  self_attention.{q,k}_layernorm.weight  <- self_attn.{q,k}_norm.weight
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from megatron.early_exit.hf.errors import ConversionError


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    qkv_bias: bool = False
    """Biases on the q/k/v projections (only there: o_proj and the MLP have none)."""

    qk_norm: bool = False
    """RMSNorm on each query and key head, before RoPE."""

    refused_true: Tuple[str, ...] = ()
    """config.json switches this converter cannot represent when true."""

    window_switch: Optional[str] = None
    """The config.json key that turns `sliding_window` on (None: `sliding_window` alone decides)."""

    has_sliding_window: bool = False
    config_extra: Dict[str, object] = field(default_factory=dict)
    """Keys written to an exported config.json beyond the common ones."""


FAMILIES: Dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "llama",
            "LlamaForCausalLM",
            refused_true=("attention_bias", "mlp_bias"),
            config_extra={"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
        ),
        Family("mistral", "MistralForCausalLM", has_sliding_window=True, config_extra={"sliding_window": None}),
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            qkv_bias=True,
            window_switch="use_sliding_window",
            has_sliding_window=True,
            config_extra={"use_sliding_window": False, "sliding_window": None},
        ),
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            qk_norm=True,
            refused_true=("attention_bias",),
            window_switch="use_sliding_window",
            has_sliding_window=True,
            config_extra={"attention_bias": False, "use_sliding_window": False, "sliding_window": None},
        ),
    )
}
SUPPORTED = ", ".join(f"{f.model_type!r} ({f.architecture})" for f in FAMILIES.values())


def family_of_hf_config(cfg: dict, source: str) -> Family:
    """The family of a config.json, with its refusals applied."""
    model_type = cfg.get("model_type")
    family = FAMILIES.get(model_type)
    architectures = cfg.get("architectures") or [family.architecture if family else "?"]
    if family is None or family.architecture not in architectures:
        raise ConversionError(
            f"{source}: model_type {model_type!r} ({', '.join(architectures)}) is not supported: "
            f"the converter reads {SUPPORTED}"
        )
    for key in family.refused_true:
        if cfg.get(key):
            raise ConversionError(f"{source}: {key} true is not supported ({family.architecture} converts without it)")
    _refuse_sliding_window(cfg, family, source)
    return family


def _refuse_sliding_window(cfg: dict, family: Family, source: str) -> None:
    """Sliding-window attention is not implemented: a window that some layer applies to
    sequences the model takes is refused (one that covers the whole context changes nothing)."""
    window = cfg.get("sliding_window") if family.has_sliding_window else None
    if window is None or (family.window_switch and not cfg.get(family.window_switch)):
        return
    if not isinstance(window, int) or window < 1:
        raise ConversionError(f"{source}: sliding_window must be a positive integer or null, got {window!r}")
    context = cfg.get("max_position_embeddings", 2048)
    if window < context and _some_layer_slides(cfg, family):
        raise ConversionError(
            f"{source}: sliding_window {window} is smaller than max_position_embeddings {context}: sliding-window "
            f"attention is not supported (set max_position_embeddings to {window} or less to use it on sequences "
            "that fit)"
        )


def _some_layer_slides(cfg: dict, family: Family) -> bool:
    """transformers' rule: `layer_types` where given; else Qwen slides from layer
    max_window_layers on, Mistral everywhere."""
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list):
        return "sliding_attention" in layer_types
    if family.window_switch:
        return cfg.get("max_window_layers", 0) < (cfg.get("num_hidden_layers") or 0)
    return True


def family_of_model(qkv_bias: bool, qk_norm: bool, requested: Optional[str] = None) -> Family:
    """The family that expresses a model with these attention extras: `requested` (a
    model_type) when it can, else the only one that can (llama when there are none)."""
    can = [f for f in FAMILIES.values() if (f.qkv_bias, f.qk_norm) == (qkv_bias, qk_norm)]
    if not can:
        raise ConversionError("no Hugging Face family has both --add-qkv-bias and --qk-layernorm")
    if requested in (None, "auto"):
        return can[0]
    if requested not in FAMILIES:
        raise ConversionError(f"--model-type {requested!r}: choose auto, {', '.join(FAMILIES)}")
    if FAMILIES[requested] not in can:
        have = ", ".join(n for n, on in (("--add-qkv-bias", qkv_bias), ("--qk-layernorm", qk_norm)) if on) or "neither"
        raise ConversionError(
            f"--model-type {requested}: the checkpoint has {have} of --add-qkv-bias/--qk-layernorm; "
            f"use --model-type {' or '.join(f.model_type for f in can)}"
        )
    return FAMILIES[requested]
