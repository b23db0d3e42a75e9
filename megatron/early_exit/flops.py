"""Analytic FLOP counts of a forward pass, for benchmarks and throughput logging.

Matrix multiplications only (2 FLOPs per multiply-add); norms, softmax and
elementwise work are a few FLOPs per element and are left out, as is customary.
"""

from __future__ import annotations

from megatron.core.transformer import TransformerConfig

from megatron.early_exit.config import EarlyExitConfig


def layer_flops(config: TransformerConfig, tokens: int, seq_length: int) -> float:
    h = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = config.num_query_groups or heads
    head_dim = config.kv_channels or h // heads
    qkv = h * (heads + 2 * kv_heads) * head_dim
    proj = heads * head_dim * h
    ffn = config.ffn_hidden_size * h * (3 if config.gated_linear_unit else 2)
    # QK^T and PV over a causal sequence: half of the s x s scores are needed, but the
    # dense kernels compute all of them.
    attention = 2 * heads * head_dim * seq_length
    return 2.0 * tokens * (qkv + proj + ffn + attention)


def output_layer_flops(config: TransformerConfig, tokens: int, vocab_size: int) -> float:
    return 2.0 * tokens * config.hidden_size * vocab_size


def exit_heads_flops(
    config: TransformerConfig, ee_config: EarlyExitConfig, tokens: int, seq_length: int, vocab_size: int
) -> float:
    """Forward FLOPs of all exit heads."""
    per_exit = output_layer_flops(config, tokens, vocab_size)
    if ee_config.use_exit_block:
        per_exit += layer_flops(config, tokens, seq_length)
    if ee_config.use_exit_mlp:
        per_exit += 2.0 * tokens * config.ffn_hidden_size * config.hidden_size * (3 if config.gated_linear_unit else 2)
    return per_exit * ee_config.num_exits


def backbone_flops(config: TransformerConfig, tokens: int, seq_length: int, vocab_size: int) -> float:
    """Forward FLOPs of the model without exits."""
    return config.num_layers * layer_flops(config, tokens, seq_length) + output_layer_flops(config, tokens, vocab_size)
