"""Build a model for inference from a pretraining checkpoint (`--save DIR` of
pretrain_early_exit_gpt.py), in any TP/PP layout, plus its tokenizer.

The checkpoint's common state holds the training flags; the model is rebuilt from them
as training built it, then only its weights are read (dist_checkpointing reshards them
to this layout). Optimizer and RNG state stay on disk.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Tuple

import torch

from megatron.early_exit.inference.errors import InferenceConfigError


def checkpoint_path(root: str, iteration: Optional[int] = None) -> str:
    from megatron.early_exit.training.checkpointing import CheckpointError, resolve

    try:
        return resolve(root, iteration)
    except CheckpointError as err:
        raise InferenceConfigError(str(err)) from err


def stored_args(path: str, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> argparse.Namespace:
    """The training flags saved with the checkpoint, defaults filled for newer flags,
    re-laid out for inference (these TP and PP sizes, no sequence parallelism)."""
    from megatron.early_exit.training.arguments import build_early_exit_config, build_parser
    from megatron.early_exit.training.checkpointing import read_common

    saved = read_common(path)["args"]
    args = argparse.Namespace(**{a.dest: a.default for a in build_parser()._actions if a.dest != "help"})
    vars(args).update(saved)
    args.saved_tensor_model_parallel_size = args.tensor_model_parallel_size
    args.tensor_model_parallel_size = tensor_model_parallel_size
    args.pipeline_model_parallel_size = pipeline_model_parallel_size
    args.sequence_parallel = False
    # The layer modules follow the device inference runs on; checkpoints fit any of them.
    args.transformer_impl = None
    args.ee_config = build_early_exit_config(args)
    return args


def stored_vocab_size(args: argparse.Namespace, tokenizer=None) -> int:
    """The model's (padded) vocabulary: as saved, or padded as the training layout did,
    whatever the TP size now."""
    from megatron.early_exit.training.arguments import padded_vocab_size
    from megatron.early_exit.training.tokenizers import build_tokenizer

    if getattr(args, "padded_vocab_size", None):
        return args.padded_vocab_size
    if tokenizer is None:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size)
    return padded_vocab_size(tokenizer.vocab_size, argparse.Namespace(
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        tensor_model_parallel_size=args.saved_tensor_model_parallel_size))


def load_model(root: str, tensor_model_parallel_size: int = 1, device: Optional[torch.device] = None,
               iteration: Optional[int] = None, pipeline_model_parallel_size: int = 1,
               transformer_impl: Optional[str] = None) -> Tuple[torch.nn.Module, object, argparse.Namespace]:
    """(EarlyExitGPTModel in eval mode: this rank's pipeline stage, tokenizer, flags).
    Parallel state must be initialised with the same TP and PP sizes. `device` defaults to
    this process's target device, `transformer_impl` to the one that device gets."""
    from megatron.early_exit.training.checkpointing import load_weights
    from megatron.early_exit.training.tokenizers import build_tokenizer
    from megatron.early_exit.training.trainer import build_model

    from megatron.core import parallel_state

    initialised = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size())
    if initialised != (tensor_model_parallel_size, pipeline_model_parallel_size):
        raise InferenceConfigError(f"parallel state is TP={initialised[0]} PP={initialised[1]}, but the model was asked for "
                                   f"TP={tensor_model_parallel_size} PP={pipeline_model_parallel_size}")
    path = checkpoint_path(root, iteration)
    args = stored_args(path, tensor_model_parallel_size, pipeline_model_parallel_size)
    if args.num_layers % pipeline_model_parallel_size:
        raise InferenceConfigError(f"--pipeline-model-parallel-size {pipeline_model_parallel_size} does not divide "
                                   f"the checkpoint's {args.num_layers} layers")
    from megatron.early_exit.parallel import target_device

    device = device or target_device()
    args.transformer_impl = transformer_impl
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size)
    vocab_size = stored_vocab_size(args, tokenizer)
    if vocab_size % tensor_model_parallel_size:
        raise InferenceConfigError(f"the checkpoint's padded vocabulary ({vocab_size}) does not split over "
                                   f"--tensor-model-parallel-size {tensor_model_parallel_size}")
    model = build_model(args, device, vocab_size)
    load_weights(path, model)
    return model.eval(), tokenizer, args
