"""Build the model a ModelConfig describes, for this rank's place in the parallel layout.

The one place a model is made from its description: training (from its flags),
inference and the server (from a checkpoint), conversion (from config.json).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import parallel_state

from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
from megatron.early_exit.models.init import initialize_layout_invariant
from megatron.early_exit.models.model_config import ModelConfig


def build_model(config: ModelConfig, device: torch.device, seed: int = 1234, transformer_impl: Optional[str] = None,
                sequence_parallel: bool = False, params_dtype: Optional[str] = None,
                document_mask: bool = False) -> EarlyExitGPTModel:
    """This rank's stage of the model (TP and PP from megatron-core's parallel state),
    initialised layout-invariantly from `seed`, on `device`. `params_dtype` overrides
    the trained precision; `document_mask`: forward takes any attention mask."""
    transformer_config = config.transformer_config(
        parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel, device=device, transformer_impl=transformer_impl, params_dtype=params_dtype,
    )
    model = EarlyExitGPTModel(
        transformer_config,
        config.early_exit,
        vocab_size=config.padded_vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        rotary_base=config.rotary_base,
        rotary_percent=config.rotary_percent,
        # Linear position interpolation and Llama 3.x frequency scaling.
        seq_len_interpolation_factor=config.rotary_seq_len_interpolation_factor,
        rope_scaling=config.use_rope_scaling,
        rope_scaling_factor=config.rope_scaling_factor,
        document_mask=document_mask,
    )
    initialize_layout_invariant(model, seed, config.init_method_std, config.num_layers)
    model.model_config = config  # what checkpoints store
    return model.to(device)
