"""Hugging Face Llama <-> our model: the config mapping and the weight key map, both ways.

Config: `shape_from_hf_config` reads a config.json (transformers 4.x `rope_theta` and
`rope_scaling`, or 5.x `rope_parameters`) into a `LlamaShape`, refusing what megatron-core
cannot compute; `model_flags` turns a shape into our training flags. Back:
`shape_from_args` (refusing models that are not Llama-shaped) and `hf_config`.

Weights: `hf_names` is the declarative key map from one of our parameter names (TP=1,
global layer numbers, as `sharding.full_state_dict` gives them) to the Hugging Face
tensors it is made of; `to_ours` and `to_hf` apply the pair's named reshape
(`merge_qkv`/`split_qkv`, `merge_gate_up`/`split_gate_up`, or none), asserting every shape.
Exit heads use Llama's names under `exits.{layer}.` (their own safetensors file):
`norm`, `mlp.{gate,up,down}_proj`, `block.<decoder layer names>`, `lm_head`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron.early_exit.hf.errors import ConversionError

# megatron-core's Llama 3.x RoPE scaling has these constants built in
# (RotaryEmbedding._apply_scaling); a config with other values cannot be represented.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
ROPE_KINDS = ("default", "linear", "llama3")
DTYPES = {"float32": None, "bfloat16": "--bf16", "float16": "--fp16"}


@dataclass(frozen=True)
class LlamaShape:
    """Everything that fixes a Llama model's weights and its forward computation."""

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
    dtype: str = "float32"  # a key of DTYPES
    initializer_range: float = 0.02
    attention_dropout: float = 0.0


# ----------------------------------------------------------------------------- config: HF -> ours


def shape_from_hf_config(cfg: dict, source: str = "config.json") -> LlamaShape:
    """Validate a Hugging Face config.json (as a dict) and read its Llama shape."""
    model_type = cfg.get("model_type")
    architectures = cfg.get("architectures") or ["LlamaForCausalLM"]
    if model_type != "llama" or "LlamaForCausalLM" not in architectures:
        raise ConversionError(
            f"{source}: model_type {model_type!r} ({', '.join(architectures)}) is not supported: "
            "the converter reads Llama-family checkpoints (model_type 'llama', LlamaForCausalLM)"
        )
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ConversionError(f"{source}: {key} must be a positive integer, got {cfg.get(key)!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (Llama's SwiGLU uses 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ConversionError(f"{source}: {key} true is not supported (Llama has no linear biases)")
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    if heads % groups:
        raise ConversionError(f"{source}: num_attention_heads ({heads}) is not divisible by num_key_value_heads ({groups})")
    theta, kind, factor = _rope_from_hf(cfg, source)
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    if dtype not in DTYPES:
        raise ConversionError(f"{source}: dtype {dtype!r} is not supported ({', '.join(DTYPES)})")
    return LlamaShape(
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
        raise ConversionError(f"{source}: partial_rotary_factor is not supported by Llama conversion")
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


def model_flags(shape: LlamaShape) -> List[str]:
    """Our training flags for a model of this shape (tokenizer, layout and dtype excluded)."""
    flags = [
        "--num-layers", shape.num_layers, "--hidden-size", shape.hidden_size,
        "--ffn-hidden-size", shape.ffn_hidden_size, "--num-attention-heads", shape.num_attention_heads,
    ]
    if shape.num_query_groups != shape.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", shape.num_query_groups]
    if shape.head_dim * shape.num_attention_heads != shape.hidden_size:
        flags += ["--kv-channels", shape.head_dim]
    flags += [
        "--seq-length", shape.max_position_embeddings, "--max-position-embeddings", shape.max_position_embeddings,
        "--normalization", "RMSNorm", "--norm-epsilon", repr(shape.norm_epsilon), "--swiglu", "--disable-bias-linear",
        "--position-embedding-type", "rope", "--rotary-base", int(shape.rope_theta),
        "--hidden-dropout", 0, "--attention-dropout", repr(shape.attention_dropout),
        "--init-method-std", repr(shape.initializer_range),
    ]
    if shape.rope_kind == "linear":
        flags += ["--rotary-seq-len-interpolation-factor", repr(shape.rope_factor)]
    elif shape.rope_kind == "llama3":
        flags += ["--use-rope-scaling", "--rope-scaling-factor", repr(shape.rope_factor)]
    if not shape.tie_word_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    return [str(f) for f in flags]


# ----------------------------------------------------------------------------- config: ours -> HF


def shape_from_args(args, vocab_size: int) -> LlamaShape:
    """The Llama shape of a model built from our flags; refuses what Llama cannot express."""
    refusals = [
        (args.normalization != "RMSNorm", f"--normalization {args.normalization} (Llama uses RMSNorm)"),
        (not args.swiglu, "no --swiglu (Llama's MLP is SwiGLU)"),
        (not args.disable_bias_linear, "linear biases (Llama has none: --disable-bias-linear)"),
        (args.position_embedding_type != "rope", f"--position-embedding-type {args.position_embedding_type} (Llama uses rope)"),
        (args.rotary_percent != 1.0, f"--rotary-percent {args.rotary_percent} (Llama rotates whole heads)"),
        (bool(args.use_rope_scaling and args.rotary_seq_len_interpolation_factor),
         "--use-rope-scaling together with --rotary-seq-len-interpolation-factor"),
    ]
    for refused, what in refusals:
        if refused:
            raise ConversionError(f"the checkpoint is not a Llama model: {what}")
    kind, factor = "default", None
    if args.rotary_seq_len_interpolation_factor:
        kind, factor = "linear", float(args.rotary_seq_len_interpolation_factor)
    elif args.use_rope_scaling:
        kind, factor = "llama3", float(args.rope_scaling_factor)
    heads = args.num_attention_heads
    return LlamaShape(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=heads,
        num_query_groups=args.num_query_groups or heads,
        head_dim=args.kv_channels or args.hidden_size // heads,
        vocab_size=vocab_size,
        max_position_embeddings=args.max_position_embeddings,
        norm_epsilon=args.norm_epsilon,
        rope_theta=float(args.rotary_base),
        rope_kind=kind,
        rope_factor=factor,
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        dtype="bfloat16" if args.bf16 else "float16" if args.fp16 else "float32",
        initializer_range=args.init_method_std,
        attention_dropout=args.attention_dropout,
    )


def hf_config(shape: LlamaShape, bos_token_id=None, eos_token_id=None, pad_token_id=None,
              early_exit: Optional[dict] = None) -> dict:
    """A config.json for LlamaForCausalLM; RoPE is written for transformers 4.x and 5.x."""
    rope = {"rope_type": shape.rope_kind, "rope_theta": shape.rope_theta}
    if shape.rope_kind != "default":
        rope["factor"] = shape.rope_factor
    if shape.rope_kind == "llama3":
        rope.update(LLAMA3_FIXED)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "attention_bias": False,
        "attention_dropout": shape.attention_dropout,
        "mlp_bias": False,
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
        "pretraining_tp": 1,
        "use_cache": True,
    }
    if early_exit is not None:
        cfg["early_exit"] = early_exit
    return cfg


# ----------------------------------------------------------------------------- weights: the key map

# Inside one transformer layer: ours -> the Hugging Face LlamaDecoderLayer tensors it is made of.
LAYER_KEYS: Dict[str, Tuple[str, ...]] = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),  # Transformer Engine spec
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
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
    raise ConversionError(f"parameter {name} has no Hugging Face Llama counterpart")


def is_exit_name(name: str) -> bool:
    return name.startswith(EXIT_PREFIX)


# ----------------------------------------------------------------------------- weights: reshapes


def _check(name: str, tensor: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ConversionError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected)} from the config")


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: LlamaShape) -> torch.Tensor:
    """q [heads*d, h], k and v [groups*d, h] -> megatron-core's per-group [q..q k v] rows."""
    g, d = shape.num_query_groups, shape.head_dim
    per_group = shape.num_attention_heads // g
    h = q.shape[-1]
    merged = torch.cat([q.reshape(g, per_group * d, h), k.reshape(g, d, h), v.reshape(g, d, h)], dim=1)
    return merged.reshape(g * (per_group + 2) * d, h)


def split_qkv(qkv: torch.Tensor, shape: LlamaShape) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = shape.num_query_groups, shape.head_dim
    per_group = shape.num_attention_heads // g
    h = qkv.shape[-1]
    q, k, v = qkv.reshape(g, (per_group + 2) * d, h).split([per_group * d, d, d], dim=1)
    return q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU fc1 at TP=1 is [gate; up] (sharding.py cuts each half for TP)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def to_ours(name: str, parts: Sequence[Tuple[str, torch.Tensor]], shape: LlamaShape, expected: Sequence[int]) -> torch.Tensor:
    """Build our parameter `name` (full shape `expected`) from its Hugging Face tensors."""
    hidden = expected[-1]
    if name.endswith("linear_qkv.weight"):
        (qn, q), (kn, k), (vn, v) = parts
        _check(qn, q, (shape.num_attention_heads * shape.head_dim, hidden))
        _check(kn, k, (shape.num_query_groups * shape.head_dim, hidden))
        _check(vn, v, (shape.num_query_groups * shape.head_dim, hidden))
        return merge_qkv(q, k, v, shape)
    if name.endswith("linear_fc1.weight"):
        (gn, gate), (un, up) = parts
        _check(gn, gate, (expected[0] // 2, hidden))
        _check(un, up, (expected[0] // 2, hidden))
        return merge_gate_up(gate, up)
    ((hn, tensor),) = parts
    _check(hn, tensor, expected)
    return tensor


def to_hf(name: str, tensor: torch.Tensor, shape: LlamaShape) -> Dict[str, torch.Tensor]:
    """Our full parameter `name` as its Hugging Face tensors."""
    names = hf_names(name)
    if name.endswith("linear_qkv.weight"):
        return dict(zip(names, split_qkv(tensor, shape)))
    if name.endswith("linear_fc1.weight"):
        return dict(zip(names, split_gate_up(tensor)))
    return {names[0]: tensor.contiguous()}


# ----------------------------------------------------------------------------- exits in config.json

EXIT_SWITCHES = ("use_exit_norm", "use_exit_mlp", "use_exit_block", "untie_exit_output_weights", "pre_exit")
EXIT_LISTS = ("exit_layer_nums", "exit_layer_weight", "exit_layer_temperature")
EXIT_FORMAT_VERSION = 1


def exit_section(args, weights_file: str) -> dict:
    """config.json's `early_exit` section: where the exits are and what they are made of."""
    section = {"format_version": EXIT_FORMAT_VERSION, "weights_file": weights_file}
    section.update({key: list(getattr(args.ee_config, key)) for key in EXIT_LISTS})
    section.update({key: bool(getattr(args.ee_config, key)) for key in EXIT_SWITCHES})
    return section


def exit_flags(section: dict, source: str = "config.json") -> List[str]:
    """Our exit flags from an `early_exit` section."""
    unknown = sorted(set(section) - set(EXIT_SWITCHES) - set(EXIT_LISTS) - {"format_version", "weights_file"})
    if unknown or section.get("format_version", EXIT_FORMAT_VERSION) != EXIT_FORMAT_VERSION:
        raise ConversionError(f"{source}: early_exit section has unknown keys {unknown} or format_version "
                              f"{section.get('format_version')!r} (this converter writes {EXIT_FORMAT_VERSION})")
    flags: List[str] = []
    for key in EXIT_LISTS:
        values = section.get(key) or []
        if not isinstance(values, list):
            raise ConversionError(f"{source}: early_exit.{key} must be a list, got {values!r}")
        if values:
            flags += ["--" + key.replace("_", "-")] + [repr(v) if isinstance(v, float) else str(v) for v in values]
    flags += ["--" + key.replace("_", "-") for key in EXIT_SWITCHES if section.get(key)]
    return flags
