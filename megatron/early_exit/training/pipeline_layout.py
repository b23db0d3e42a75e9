"""Pipeline layout flags: the stages a run builds (first stages only for exit tuning),
bubble-filling counts, and the interleaved schedule's model chunks."""

from __future__ import annotations

from typing import Tuple

from megatron.early_exit.errors import ConfigError


def built_stages(args) -> Tuple[int, int]:
    """(layers, pipeline stages) of the model this run builds: the whole model, or with
    --tune-exit-pipeline-parallel-size k its first k of --pipeline-model-parallel-size
    stages (the first layers, numbers unchanged). The flags keep describing the whole
    model: a checkpoint to load is compared with it."""
    k, p = args.tune_exit_pipeline_parallel_size, args.pipeline_model_parallel_size
    if k is None:
        return args.num_layers, p
    return args.num_layers // p * k, k


def _validate_exit_tuning_stages(args):
    """--tune-exit-pipeline-parallel-size k: the first k of the p stages must hold every exit."""
    k, p = args.tune_exit_pipeline_parallel_size, args.pipeline_model_parallel_size
    if k is None:
        return
    if not args.tune_exit:
        raise ConfigError("--tune-exit-pipeline-parallel-size needs --tune-exit")
    if not 1 <= k <= p:
        raise ConfigError(
            f"--tune-exit-pipeline-parallel-size ({k}) must be in 1..--pipeline-model-parallel-size ({p})"
        )
    if args.num_layers % p:
        raise ConfigError(f"--num-layers ({args.num_layers}) is not divisible by --pipeline-model-parallel-size ({p})")
    kept = built_stages(args)[0]
    beyond = [n for n in args.exit_layer_nums if n > kept]
    if beyond:
        raise ConfigError(
            f"--exit-layer-nums {beyond} lie beyond the first {k} of {p} stages (layers 1..{kept}) "
            "kept by --tune-exit-pipeline-parallel-size"
        )


def _validate_pipeline_args(args):
    pp = args.pipeline_model_parallel_size
    if args.fill_explicit_bubbles and pp == 1:
        raise ConfigError("--fill-explicit-bubbles needs --pipeline-model-parallel-size > 1")
    if args.tune_exit and not args.exit_layer_nums:
        raise ConfigError("--tune-exit needs --exit-layer-nums")
    for flag in ("num_fill_warmup_microbatches", "num_fill_cooldown_microbatches"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    if args.backward_forward_ratio <= 0:
        raise ConfigError(f"--backward-forward-ratio must be > 0, got {args.backward_forward_ratio}")
    _validate_distillation_stages(args)


def _validate_distillation_stages(args):
    """Self-distillation needs the final layer's logits beside each exit: every exit on the
    stage that holds the output layer (and that stage built)."""
    if not getattr(args, "exit_distill_weight", 0.0):
        return
    layers, stages = built_stages(args)
    if layers != args.num_layers:
        raise ConfigError(
            "--exit-distill-weight needs the output layer, which --tune-exit-pipeline-parallel-size "
            f"{args.tune_exit_pipeline_parallel_size} leaves out"
        )
    if stages == 1:
        return
    first_of_last = layers - layers // stages + 1
    early = [n for n in args.exit_layer_nums if n < first_of_last]
    if early:
        raise ConfigError(
            f"--exit-distill-weight: exits {early} are not on the last pipeline stage (layers "
            f"{first_of_last}..{layers}), where the final layer's logits are; use exits there, or PP=1"
        )


def virtual_pipeline_chunks(args) -> int:
    """Model chunks per pipeline stage: v of the interleaved schedule, 1 without it."""
    from megatron.early_exit.pipeline.interleaved import VIRTUAL_FLAG, num_model_chunks

    per_stage, chunks = (
        getattr(args, "num_layers_per_virtual_pipeline_stage", None),
        getattr(args, "num_virtual_stages_per_pipeline_rank", None),
    )
    if per_stage is not None and chunks is not None:
        raise ConfigError(f"{VIRTUAL_FLAG} and --num-virtual-stages-per-pipeline-rank cannot be combined")
    if chunks is not None:
        if chunks < 1:
            raise ConfigError(f"--num-virtual-stages-per-pipeline-rank must be >= 1, got {chunks}")
        per_stage = args.num_layers // max(1, args.pipeline_model_parallel_size * chunks)
        if chunks == 1:
            return 1
        if per_stage * args.pipeline_model_parallel_size * chunks != args.num_layers:
            raise ConfigError(
                f"--num-virtual-stages-per-pipeline-rank {chunks}: --num-layers ({args.num_layers}) must be "
                f"divisible by --pipeline-model-parallel-size ({args.pipeline_model_parallel_size}) x {chunks}"
            )
    if per_stage is None:
        return 1
    return num_model_chunks(args.num_layers, args.pipeline_model_parallel_size, per_stage)


def _validate_virtual_pipeline(args):
    """The interleaved schedule: EE-LLM's bubble filling and exit tuning are defined for plain 1F1B."""
    from megatron.early_exit.pipeline.interleaved import VIRTUAL_FLAG, check_num_microbatches

    if virtual_pipeline_chunks(args) == 1:
        return
    if args.fill_explicit_bubbles:
        raise ConfigError(
            f"--fill-explicit-bubbles cannot be combined with {VIRTUAL_FLAG}: EE-LLM's bubble filling is "
            "defined for the plain 1F1B schedule"
        )
    if args.tune_exit:
        raise ConfigError(f"--tune-exit cannot be combined with {VIRTUAL_FLAG}: exit tuning runs the plain schedule")
    if getattr(args, "exit_distill_weight", 0.0):
        raise ConfigError(
            f"--exit-distill-weight cannot be combined with {VIRTUAL_FLAG}: the final layer's logits "
            "are on the last model chunk only"
        )
    if not args.rampup_batch_size:
        check_num_microbatches(args.num_microbatches, args.pipeline_model_parallel_size)
