"""Pipeline layout: the stages a run builds (first stages only for exit tuning) and the
interleaved schedule's model chunks, from plain sizes (the flags' rules are checked in
training/argument_checks.py)."""

from __future__ import annotations

from typing import Optional, Tuple

from megatron.early_exit.errors import ConfigError


def built_stages(
    num_layers: int, pipeline_model_parallel_size: int, tune_exit_pipeline_parallel_size: Optional[int] = None
) -> Tuple[int, int]:
    """(layers, pipeline stages) of the model a run builds: the whole model, or with
    --tune-exit-pipeline-parallel-size k its first k of --pipeline-model-parallel-size
    stages (the first layers, numbers unchanged). The flags keep describing the whole
    model: a checkpoint to load is compared with it."""
    k, p = tune_exit_pipeline_parallel_size, pipeline_model_parallel_size
    if k is None:
        return num_layers, p
    return num_layers // p * k, k


def virtual_pipeline_chunks(
    num_layers: int,
    pipeline_model_parallel_size: int,
    num_layers_per_virtual_pipeline_stage: Optional[int] = None,
    num_virtual_stages_per_pipeline_rank: Optional[int] = None,
) -> int:
    """Model chunks per pipeline stage: v of the interleaved schedule, 1 without it."""
    from megatron.early_exit.pipeline.interleaved import VIRTUAL_FLAG, num_model_chunks

    per_stage, chunks, pp = (
        num_layers_per_virtual_pipeline_stage,
        num_virtual_stages_per_pipeline_rank,
        (pipeline_model_parallel_size),
    )
    if per_stage is not None and chunks is not None:
        raise ConfigError(f"{VIRTUAL_FLAG} and --num-virtual-stages-per-pipeline-rank cannot be combined")
    if chunks is not None:
        if chunks < 1:
            raise ConfigError(f"--num-virtual-stages-per-pipeline-rank must be >= 1, got {chunks}")
        per_stage = num_layers // max(1, pp * chunks)
        if chunks == 1:
            return 1
        if per_stage * pp * chunks != num_layers:
            raise ConfigError(
                f"--num-virtual-stages-per-pipeline-rank {chunks}: --num-layers ({num_layers}) must be "
                f"divisible by --pipeline-model-parallel-size ({pp}) x {chunks}"
            )
    if per_stage is None:
        return 1
    return num_model_chunks(num_layers, pp, per_stage)
