"""Hugging Face Llama-family models <-> ours: the config mapping and the weight key map, both ways.

Config: `shape_from_hf_config` reads a config.json (transformers 4.x `rope_theta` and
`rope_scaling`, or 5.x `rope_parameters`) into an `HFShape`, refusing what megatron-core
cannot compute (the family's own refusals are in families.py); `model_config` turns a shape
into our ModelConfig. Back: `shape_from_model_config` (refusing models no family expresses)
and `hf_config`.
config.json's `early_exit` section holds the EarlyExitConfig (`exit_section`, `exit_config`).

Weights: `hf_names` is the declarative key map from one of our parameter names (TP=1,
global layer numbers, as `sharding.full_state_dict` gives them) to the Hugging Face
tensors it is made of; `to_ours` and `to_hf` apply the pair's named reshape
(`merge_qkv`/`split_qkv`, `merge_gate_up`/`split_gate_up`, or none), asserting every shape.
Exit heads use Llama's names under `exits.{layer}.` (their own safetensors file):
`norm`, `mlp.{gate,up,down}_proj`, `block.<decoder layer names>`, `lm_head`. QKV biases
(Qwen2) and q/k norms (Qwen3) are two more entries of the same map.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.hf.errors import ConversionError
from megatron.early_exit.hf.families import FAMILIES, family_of_hf_config, family_of_model
from megatron.early_exit.models.model_config import DTYPES, ModelConfig, TokenizerConfig, dtype_name

# megatron-core's Llama 3.x RoPE scaling has these constants built in
# (RotaryEmbedding._apply_scaling); a config with other values cannot be represented.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
ROPE_KINDS = ("default", "linear", "llama3")
# Fields HFShape and ModelConfig share by name and meaning (the rest map one by one below).
SAME_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "max_position_embeddings",
    "norm_epsilon",
)


def hf_dtype_name(params_dtype: str) -> str:
    """config.json's name of one of our precisions ("bf16" -> "bfloat16": torch's name)."""
    return str(DTYPES[params_dtype]).replace("torch.", "")


def params_dtype_of(hf_name: str) -> str:
    """Our precision of a config.json dtype name ("bfloat16" -> "bf16")."""
    return dtype_name(getattr(torch, hf_name))


SUPPORTED_HF_DTYPES = tuple(hf_dtype_name(name) for name in DTYPES)


@dataclass(frozen=True)
class HFShape:
    """Everything that fixes a Llama-family model's weights and its forward computation."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    rope_theta: float
    rope_kind: str = "default"  # one of ROPE_KINDS
    rope_factor: Optional[float] = None  # linear: position divisor; llama3: frequency factor
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # one of SUPPORTED_HF_DTYPES
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    model_type: str = "llama"  # a key of families.FAMILIES
    qkv_bias: bool = False
    qk_norm: bool = False


# ----------------------------------------------------------------------------- config: HF -> ours


def shape_from_hf_config(cfg: dict, source: str = "config.json") -> HFShape:
    """Validate a Hugging Face config.json (as a dict) and read its shape."""
    family = family_of_hf_config(cfg, source)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ConversionError(f"{source}: {key} must be a positive integer, got {cfg.get(key)!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(
            f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (the SwiGLU MLP uses 'silu')"
        )
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    if heads % groups:
        raise ConversionError(
            f"{source}: num_attention_heads ({heads}) is not divisible by num_key_value_heads ({groups})"
        )
    theta, kind, factor = _rope_from_hf(cfg, source)
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    if dtype not in SUPPORTED_HF_DTYPES:
        raise ConversionError(f"{source}: dtype {dtype!r} is not supported ({', '.join(SUPPORTED_HF_DTYPES)})")
    return HFShape(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_kind=kind,
        rope_factor=factor,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype=dtype,
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        model_type=family.model_type,
        qkv_bias=family.qkv_bias,
        qk_norm=family.qk_norm,
    )


def _rope_from_hf(cfg: dict, source: str) -> Tuple[float, str, Optional[float]]:
    """(theta, kind, factor) from transformers 5.x `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        scaling = params
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        scaling = cfg.get("rope_scaling") or {}
        theta = cfg.get("rope_theta", 10000.0)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if float(theta) != int(theta):
        raise ConversionError(f"{source}: rope_theta {theta} is not an integer (--rotary-base takes integers)")
    if scaling.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError(f"{source}: partial_rotary_factor is not supported (heads are rotated whole)")
    if kind not in ROPE_KINDS:
        raise ConversionError(
            f"{source}: RoPE scaling {kind!r} cannot be represented in megatron-core's RotaryEmbedding "
            f"(supported: {', '.join(ROPE_KINDS)})"
        )
    if kind == "default":
        return float(theta), kind, None
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise ConversionError(f"{source}: RoPE scaling {kind!r} needs a positive factor, got {factor!r}")
    if kind == "llama3":
        for key, fixed in LLAMA3_FIXED.items():
            if float(scaling.get(key, fixed)) != fixed:
                raise ConversionError(
                    f"{source}: llama3 RoPE scaling with {key}={scaling[key]} cannot be represented "
                    f"(megatron-core fixes {key}={fixed:g})"
                )
    return float(theta), kind, float(factor)


def model_config(
    shape: HFShape,
    make_vocab_size_divisible_by: int,
    tokenizer: TokenizerConfig,
    params_dtype: str,
    early_exit: Optional[EarlyExitConfig] = None,
) -> ModelConfig:
    """Our description of a model of this shape (its vocabulary as the padded size)."""
    heads = shape.num_attention_heads
    return ModelConfig(
        **{k: getattr(shape, k) for k in SAME_FIELDS},
        num_query_groups=shape.num_query_groups if shape.num_query_groups != heads else None,
        kv_channels=shape.head_dim if shape.head_dim * heads != shape.hidden_size else None,
        padded_vocab_size=shape.vocab_size,
        normalization="RMSNorm",
        swiglu=True,
        disable_bias_linear=True,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta),
        rotary_seq_len_interpolation_factor=shape.rope_factor if shape.rope_kind == "linear" else None,
        use_rope_scaling=shape.rope_kind == "llama3",
        rope_scaling_factor=shape.rope_factor if shape.rope_kind == "llama3" else ModelConfig.rope_scaling_factor,
        untie_embeddings_and_output_weights=not shape.tie_word_embeddings,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        hidden_dropout=0.0,
        attention_dropout=shape.attention_dropout,
        init_method_std=shape.initializer_range,
        params_dtype=params_dtype,
        early_exit=early_exit or EarlyExitConfig(),
        tokenizer=tokenizer,
    )


# ----------------------------------------------------------------------------- config: ours -> HF


def shape_from_model_config(config: ModelConfig, model_type: Optional[str] = None) -> HFShape:
    """The Hugging Face shape of one of our models, in family `model_type` (None: the one
    its attention extras call for); refuses what no Llama-family model expresses."""
    c = config
    refusals = [
        (c.normalization != "RMSNorm", f"--normalization {c.normalization} (Llama uses RMSNorm)"),
        (not c.swiglu, "no --swiglu (Llama's MLP is SwiGLU)"),
        (not c.disable_bias_linear, "linear biases (Llama has none: --disable-bias-linear)"),
        (
            c.position_embedding_type != "rope",
            f"--position-embedding-type {c.position_embedding_type} (Llama uses rope)",
        ),
        (c.rotary_percent != 1.0, f"--rotary-percent {c.rotary_percent} (Llama rotates whole heads)"),
        (
            bool(c.use_rope_scaling and c.rotary_seq_len_interpolation_factor),
            "--use-rope-scaling together with --rotary-seq-len-interpolation-factor",
        ),
    ]
    for refused, what in refusals:
        if refused:
            raise ConversionError(f"the checkpoint is not a Llama model: {what}")
    family = family_of_model(c.add_qkv_bias, c.qk_layernorm, model_type)
    kind, factor = "default", None
    if c.rotary_seq_len_interpolation_factor:
        kind, factor = "linear", float(c.rotary_seq_len_interpolation_factor)
    elif c.use_rope_scaling:
        kind, factor = "llama3", float(c.rope_scaling_factor)
    heads = c.num_attention_heads
    return HFShape(
        **{k: getattr(c, k) for k in SAME_FIELDS},
        num_query_groups=c.num_query_groups or heads,
        head_dim=c.kv_channels or c.hidden_size // heads,
        vocab_size=c.padded_vocab_size,
        rope_theta=float(c.rotary_base),
        rope_kind=kind,
        rope_factor=factor,
        tie_word_embeddings=not c.untie_embeddings_and_output_weights,
        dtype=hf_dtype_name(c.params_dtype),
        initializer_range=c.init_method_std,
        attention_dropout=c.attention_dropout,
        model_type=family.model_type,
        qkv_bias=family.qkv_bias,
        qk_norm=family.qk_norm,
    )


def hf_config(
    shape: HFShape, bos_token_id=None, eos_token_id=None, pad_token_id=None, early_exit: Optional[dict] = None
) -> dict:
    """A config.json for the shape's family; RoPE is written for transformers 4.x and 5.x."""
    rope = {"rope_type": shape.rope_kind, "rope_theta": shape.rope_theta}
    if shape.rope_kind != "default":
        rope["factor"] = shape.rope_factor
    if shape.rope_kind == "llama3":
        rope.update(LLAMA3_FIXED)
    family = FAMILIES[shape.model_type]
    cfg = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.ffn_hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_query_groups,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": shape.norm_epsilon,
        "hidden_act": "silu",
        "attention_dropout": shape.attention_dropout,
        "initializer_range": shape.initializer_range,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "rope_parameters": rope,  # transformers 5.x
        "rope_theta": shape.rope_theta,  # transformers 4.x
        "rope_scaling": None if shape.rope_kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "dtype": shape.dtype,
        "torch_dtype": shape.dtype,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
        **family.config_extra,
    }
    if early_exit is not None:
        cfg["early_exit"] = early_exit
    return cfg


# ----------------------------------------------------------------------------- weights: the key map

# Inside one transformer layer: ours -> the Hugging Face LlamaDecoderLayer tensors it is made of.
LAYER_KEYS: Dict[str, Tuple[str, ...]] = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),  # Transformer Engine spec
    "self_attention.linear_qkv.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "self_attention.linear_qkv.bias": (
        "self_attn.q_proj.bias",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.bias",
    ),  # qwen2
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),  # qwen3
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight",),  # Transformer Engine spec
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
TOP_KEYS = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXIT = re.compile(r"^exits\.(\d+)\.(norm|output_layer|mlp|block)\.(.+)$")
EXIT_PREFIX = "exits."


def hf_names(name: str) -> Tuple[str, ...]:
    """The Hugging Face tensors that make up our parameter `name`."""
    if name in TOP_KEYS:
        return (TOP_KEYS[name],)
    match = _DECODER_LAYER.match(name)
    if match and match.group(2) in LAYER_KEYS:
        return tuple(f"model.layers.{match.group(1)}.{k}" for k in LAYER_KEYS[match.group(2)])
    match = _EXIT.match(name)
    if match:
        layer, slot, rest = match.groups()
        prefix = f"exits.{layer}."
        if slot == "norm":
            return (f"{prefix}norm.{rest}",)
        if slot == "output_layer" and rest == "weight":
            return (f"{prefix}lm_head.weight",)
        if slot == "mlp" and f"mlp.{rest}" in LAYER_KEYS:
            return tuple(prefix + k for k in LAYER_KEYS[f"mlp.{rest}"])
        if slot == "block" and rest in LAYER_KEYS:
            return tuple(f"{prefix}block.{k}" for k in LAYER_KEYS[rest])
    raise ConversionError(f"parameter {name} has no Hugging Face counterpart")


def is_exit_name(name: str) -> bool:
    return name.startswith(EXIT_PREFIX)


# ----------------------------------------------------------------------------- weights: reshapes


def _check(name: str, tensor: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ConversionError(
            f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected)} from the config"
        )


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: HFShape) -> torch.Tensor:
    """q [heads*d, ...], k and v [groups*d, ...] -> megatron-core's per-group [q..q k v] rows
    (weights [.., h] and biases alike)."""
    g, d = shape.num_query_groups, shape.head_dim
    per_group = shape.num_attention_heads // g
    rest = q.shape[1:]
    merged = torch.cat([q.reshape(g, per_group * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
    return merged.reshape(g * (per_group + 2) * d, *rest)


def split_qkv(qkv: torch.Tensor, shape: HFShape) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = shape.num_query_groups, shape.head_dim
    per_group = shape.num_attention_heads // g
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(g, (per_group + 2) * d, *rest).split([per_group * d, d, d], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU fc1 at TP=1 is [gate; up] (sharding.py cuts each half for TP)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def to_ours(
    name: str, parts: Sequence[Tuple[str, torch.Tensor]], shape: HFShape, expected: Sequence[int]
) -> torch.Tensor:
    """Build our parameter `name` (full shape `expected`) from its Hugging Face tensors."""
    hidden = expected[-1]
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        rest = tuple(expected[1:])  # (h,) for the weight, () for the bias
        (qn, q), (kn, k), (vn, v) = parts
        _check(qn, q, (shape.num_attention_heads * shape.head_dim, *rest))
        _check(kn, k, (shape.num_query_groups * shape.head_dim, *rest))
        _check(vn, v, (shape.num_query_groups * shape.head_dim, *rest))
        return merge_qkv(q, k, v, shape)
    if name.endswith("linear_fc1.weight"):
        (gn, gate), (un, up) = parts
        _check(gn, gate, (expected[0] // 2, hidden))
        _check(un, up, (expected[0] // 2, hidden))
        return merge_gate_up(gate, up)
    ((hn, tensor),) = parts
    _check(hn, tensor, expected)
    return tensor


def to_hf(name: str, tensor: torch.Tensor, shape: HFShape) -> Dict[str, torch.Tensor]:
    """Our full parameter `name` as its Hugging Face tensors."""
    names = hf_names(name)
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return dict(zip(names, split_qkv(tensor, shape)))
    if name.endswith("linear_fc1.weight"):
        return dict(zip(names, split_gate_up(tensor)))
    return {names[0]: tensor.contiguous()}


# ----------------------------------------------------------------------------- exits in config.json

# 1: the per-exit lists and structure switches only; 2: every EarlyExitConfig field.
EXIT_FORMAT_VERSION = 2
_SECTION_KEYS = ("format_version", "weights_file")


def exit_section(config: ModelConfig, weights_file: str) -> dict:
    """config.json's `early_exit` section: where the exits' weights are, and the
    EarlyExitConfig (its fields by name)."""
    section = {"format_version": EXIT_FORMAT_VERSION, "weights_file": weights_file}
    section.update(config.early_exit.to_flags())
    return section


def exit_config(section: dict, source: str = "config.json") -> EarlyExitConfig:
    """The EarlyExitConfig of an `early_exit` section (fields it leaves out default)."""
    known = EarlyExitConfig.flag_names()
    unknown = sorted(set(section) - set(known) - set(_SECTION_KEYS))
    version = section.get("format_version", EXIT_FORMAT_VERSION)
    if unknown or version not in range(1, EXIT_FORMAT_VERSION + 1):
        raise ConversionError(
            f"{source}: early_exit section has unknown keys {unknown} or format_version "
            f"{version!r} (this converter reads 1..{EXIT_FORMAT_VERSION})"
        )
    lists = [f.name for f in dataclasses.fields(EarlyExitConfig) if "List[" in str(f.type)]
    for key in lists:
        if not isinstance(section.get(key) or [], list):
            raise ConversionError(f"{source}: early_exit.{key} must be a list, got {section[key]!r}")
    try:
        return EarlyExitConfig.from_flags({k: v for k, v in section.items() if k in known})
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{source}: early_exit section: {err}") from None
