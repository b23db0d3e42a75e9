"""Build the model a ModelConfig describes, for this rank's place in the parallel layout.

The one place a model is made from its description: training (from its flags),
inference and the server (from a checkpoint), conversion (from config.json).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
from megatron.early_exit.models.init import initialize_layout_invariant
from megatron.early_exit.models.model_config import ModelConfig
from megatron.early_exit.models.recompute import RecomputeConfig


def build_model(
    config: ModelConfig,
    device: torch.device,
    seed: int = 1234,
    transformer_impl: Optional[str] = None,
    sequence_parallel: bool = False,
    params_dtype: Optional[str] = None,
    document_mask: bool = False,
    recompute: Optional[RecomputeConfig] = None,
    transformer_overrides: Optional[dict] = None,
    vp_stage: Optional[int] = None,
    num_model_chunks: int = 1,
) -> EarlyExitGPTModel:
    """This rank's stage of the model (TP and PP from megatron-core's parallel state),
    initialised layout-invariantly from `seed`, on `device`. `params_dtype` overrides
    the trained precision; `document_mask`: forward takes any attention mask;
    `recompute`: activation recomputation of a training run; `vp_stage` of
    `num_model_chunks`: one model chunk of the stage (interleaved pipeline)."""
    transformer_config = config.transformer_config(
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        device=device,
        transformer_impl=transformer_impl,
        params_dtype=params_dtype,
        recompute=recompute,
    )
    if transformer_overrides:  # a run's kernel choices (attention backend, QK scaling), not the model's
        transformer_config = dataclasses.replace(transformer_config, **transformer_overrides)
    if vp_stage is not None:  # megatron-core's layer offsets of chunk vp_stage
        transformer_config = dataclasses.replace(
            transformer_config, virtual_pipeline_model_parallel_size=num_model_chunks
        )
    first_chunk, last_chunk = vp_stage in (None, 0), vp_stage in (None, num_model_chunks - 1)
    model = EarlyExitGPTModel(
        transformer_config,
        config.early_exit,
        vocab_size=config.padded_vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage() and first_chunk,
        post_process=parallel_state.is_pipeline_last_stage() and last_chunk,
        share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        rotary_base=config.rotary_base,
        rotary_percent=config.rotary_percent,
        # Linear position interpolation and Llama 3.x frequency scaling.
        seq_len_interpolation_factor=config.rotary_seq_len_interpolation_factor,
        rope_scaling=config.use_rope_scaling,
        rope_scaling_factor=config.rope_scaling_factor,
        document_mask=document_mask,
        recompute_exit_heads=recompute is not None and recompute.exit_heads,
        vp_stage=vp_stage,
        # Data-parallel ranks hold other sequences: they draw their own skipped layers.
        layer_dropout_seed=seed * 1009 + parallel_state.get_data_parallel_rank(),
    )
    initialize_layout_invariant(model, seed, config.init_method_std, config.num_layers)
    model.model_config = config  # what checkpoints store
    return model.to(device)
