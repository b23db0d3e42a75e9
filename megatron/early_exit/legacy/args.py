"""Megatron-LM's and EE-LLM's stored `args` as our model description (ModelConfig).

Flag names are shared (ours are Megatron-LM's and EE-LLM's); older runs stored a few under
other names (`layernorm_epsilon`, `use_rotary_position_embeddings`, no `normalization`), and
settings that change what the weights compute and that we do not build are refused by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.hf.errors import ConversionError
from megatron.early_exit.models.model_config import ModelConfig, TokenizerConfig
from megatron.early_exit.tokenizers import TOKENIZER_TYPES

# Settings of Megatron-LM that change what the weights compute and that we do not build.
_REFUSED = {
    "apply_residual_connection_post_layernorm": "the residual taken after the norm",
    "apply_layernorm_1p": "LayerNorm1P (weights stored as offsets from 1)",
    "openai_gelu": "OpenAI's GeLU approximation",
    "squared_relu": "squared ReLU",
    "num_experts": "mixture of experts",
    "virtual_pipeline_model_parallel_size": "the interleaved pipeline (model0, model1, ... chunks)",
}
# Megatron-LM tokenizer names that are one of ours.
_TOKENIZER_NAMES = {"GPTSentencePieceTokenizer": "SentencePieceTokenizer"}


def legacy_flags(args: argparse.Namespace, source: str) -> dict:
    """Our flag values (ModelConfig and EarlyExitConfig fields by name) from Megatron-LM's
    or EE-LLM's stored args; a setting we cannot build stops with its name."""
    a = vars(args)
    for name, what in _REFUSED.items():
        if a.get(name):
            raise ConversionError(f"{source}: args.{name}={a[name]!r} ({what}) is not supported")
    position = a.get("position_embedding_type") or (
        "rope" if a.get("use_rotary_position_embeddings") else "learned_absolute"
    )
    normalization = a.get("normalization", "LayerNorm")
    if position not in ("rope", "learned_absolute"):
        raise ConversionError(f"{source}: args.position_embedding_type={position!r} is not supported")
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise ConversionError(f"{source}: args.normalization={normalization!r} is not supported")
    heads, hidden = a["num_attention_heads"], a["hidden_size"]
    kv_channels = a.get("kv_channels")
    flags = dict(
        num_layers=a["num_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=a.get("ffn_hidden_size"),
        num_query_groups=a.get("num_query_groups") if a.get("group_query_attention") else None,
        kv_channels=None if kv_channels in (None, hidden // heads) else kv_channels,
        max_position_embeddings=a.get("max_position_embeddings") or a.get("seq_length"),
        seq_length=a.get("seq_length"),
        normalization=normalization,
        norm_epsilon=a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5)),
        swiglu=bool(a.get("swiglu")),
        disable_bias_linear=not a.get("add_bias_linear", True),
        position_embedding_type=position,
        rotary_base=int(a.get("rotary_base") or 10000),
        rotary_percent=a.get("rotary_percent", 1.0),
        rotary_seq_len_interpolation_factor=a.get("rotary_seq_len_interpolation_factor"),
        untie_embeddings_and_output_weights=bool(a.get("untie_embeddings_and_output_weights")),
        make_vocab_size_divisible_by=a.get("make_vocab_size_divisible_by", 128),
        params_dtype="bf16" if a.get("bf16") else "fp16" if a.get("fp16") else "fp32",
        tokenizer_type=_TOKENIZER_NAMES.get(a.get("tokenizer_type"), a.get("tokenizer_type")),
        tokenizer_model=a.get("tokenizer_model"),
        vocab_file=a.get("vocab_file"),
        merge_file=a.get("merge_file"),
        vocab_size=a.get("vocab_size"),
        seed=a.get("seed", 1234),
    )
    if a.get("add_qkv_bias") and not a.get("add_bias_linear", True):
        if "add_qkv_bias" not in ModelConfig.backbone_fields():
            raise ConversionError(f"{source}: args.add_qkv_bias (QKV biases without the other biases) is not supported")
        flags["add_qkv_bias"] = True
    flags.update({k: a[k] for k in EarlyExitConfig.flag_names() if a.get(k) is not None})
    return flags


def model_config(
    flags: dict,
    padded_vocab: int,
    tokenizer: TokenizerConfig,
    params_dtype: str,
    source: str,
    first_stages_only: bool = False,
) -> ModelConfig:
    """The description of the converted model; its tokenizer must be one we build, with its
    files here (`tokenizer`'s fields, when given, replace the stored ones)."""
    given = {k: v for k, v in dataclasses.asdict(tokenizer).items() if v is not None}
    tok = dataclasses.replace(
        TokenizerConfig(
            flags["tokenizer_type"],
            flags["tokenizer_model"],
            flags["vocab_file"],
            flags["merge_file"],
            flags["vocab_size"],
        ),
        **given,
    )
    if tok.type is not None and tok.type not in TOKENIZER_TYPES:
        raise ConversionError(
            f"{source}: args.tokenizer_type {tok.type!r} is not one of ours ({', '.join(TOKENIZER_TYPES)}): "
            "give --tokenizer-type"
        )
    for key, flag in (("model", "--tokenizer-model"), ("vocab_file", "--vocab-file"), ("merge_file", "--merge-file")):
        path = getattr(tok, key)
        if path is not None and not os.path.exists(path):
            raise ConversionError(
                f"{source}: the tokenizer file {path} stored in args does not exist here: give {flag}"
            )
    values = {**flags, "params_dtype": params_dtype, "first_stages_only": first_stages_only}
    try:
        config = ModelConfig.from_flags(values, padded_vocab_size=padded_vocab)
    except ValueError as err:  # EarlyExitConfig's and ModelConfig's checks name the field
        raise ConversionError(f"{source}: {err}") from None
    return dataclasses.replace(config, tokenizer=tok)
