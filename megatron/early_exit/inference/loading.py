"""Build a model for inference from a checkpoint, in any TP/PP layout, plus its tokenizer.

The checkpoint's model description (ModelConfig, see checkpoint/reader.py) says what
to build; only its weights are read (dist_checkpointing reshards them to this layout).
Optimizer and RNG state stay on disk. Nothing here needs the training code.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron.early_exit.inference.errors import InferenceConfigError
from megatron.early_exit.models.model_config import ModelConfig


def checkpoint_path(root: str, iteration: Optional[int] = None) -> str:
    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.checkpoint.reader import resolve

    try:
        return resolve(root, iteration)
    except CheckpointError as err:
        raise InferenceConfigError(str(err)) from err


def load_model(
    root: str,
    tensor_model_parallel_size: int = 1,
    device: Optional[torch.device] = None,
    iteration: Optional[int] = None,
    pipeline_model_parallel_size: int = 1,
    transformer_impl: Optional[str] = None,
    confidence_estimator: Optional[str] = None,
    runs_forward: bool = True,
) -> Tuple[torch.nn.Module, object, ModelConfig]:
    """(EarlyExitGPTModel in eval mode: this rank's pipeline stage, tokenizer, its ModelConfig).
    Parallel state must be initialised with the same TP and PP sizes. `device` defaults to
    this process's target device, `transformer_impl` to the one that device gets;
    `confidence_estimator` a file of tools/train_confidence_estimator.py (measure "learned").
    A model that runs forward must be on this process's device (see `_checked_device`);
    `runs_forward=False` (conversion: weights only) may be loaded anywhere."""
    from megatron.core import parallel_state

    from megatron.early_exit.checkpoint.reader import load_weights, read_model_config
    from megatron.early_exit.models.builder import build_model
    from megatron.early_exit.parallel import target_device

    initialised = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    if initialised != (tensor_model_parallel_size, pipeline_model_parallel_size):
        raise InferenceConfigError(
            f"parallel state is TP={initialised[0]} PP={initialised[1]}, but the model was asked for "
            f"TP={tensor_model_parallel_size} PP={pipeline_model_parallel_size}"
        )
    device = _checked_device(device, target_device()) if runs_forward else (device or target_device())
    path = checkpoint_path(root, iteration)
    config = read_model_config(path)
    if config.num_layers % pipeline_model_parallel_size:
        raise InferenceConfigError(
            f"--pipeline-model-parallel-size {pipeline_model_parallel_size} does not divide "
            f"the checkpoint's {config.num_layers} layers"
        )
    if config.padded_vocab_size % tensor_model_parallel_size:
        raise InferenceConfigError(
            f"the checkpoint's padded vocabulary ({config.padded_vocab_size}) does not split over "
            f"--tensor-model-parallel-size {tensor_model_parallel_size}"
        )
    tokenizer = config.tokenizer.build()
    model = build_model(config, device, transformer_impl=transformer_impl)
    load_weights(path, model)
    if confidence_estimator is not None:
        from megatron.early_exit.inference.learned_confidence import ConfidenceEstimator, attach

        attach(model, ConfidenceEstimator.load(confidence_estimator))
    return model.eval(), tokenizer, config


def _checked_device(device: Optional[torch.device], target: torch.device) -> torch.device:
    """`device`, when it is this process's target device: megatron-core allocates on the
    target (rotary frequencies, buffers on `torch.cuda.current_device()`), so a model
    elsewhere fails at its first decode step with a device mismatch."""
    if device is None:
        return target
    device = torch.device(device)
    if device.type != target.type or (
        device.index is not None and target.index is not None and device.index != target.index
    ):
        raise InferenceConfigError(
            f"load_model: device {device} is not this process's device {target}; load on {target}, "
            f"or initialise the parallel state with device '{device}'"
        )
    return device
