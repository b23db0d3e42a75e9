"""The flags' rules: `validate_args` fills the defaults that depend on other flags and
rejects inconsistent settings, each error naming the flag and the value. It is the one place,
with arguments.py, that writes to the parsed namespace; the run takes the typed
RunConfig built from it afterwards (run_config.py)."""

from __future__ import annotations

import argparse
import os
from typing import List

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.errors import ConfigError
from megatron.early_exit.models.layer_specs import TRANSFORMER_ENGINE
from megatron.early_exit.models.model_config import default_ffn_hidden_size
from megatron.early_exit.training.batch_schedule import iterations_for_samples
from megatron.early_exit.training.pipeline_layout import built_stages, virtual_pipeline_chunks
from megatron.early_exit.training.run_config import TrainingConfig


def _built_stages(args):
    return built_stages(args.num_layers, args.pipeline_model_parallel_size, args.tune_exit_pipeline_parallel_size)


def _virtual_pipeline_chunks(args) -> int:
    return virtual_pipeline_chunks(
        args.num_layers,
        args.pipeline_model_parallel_size,
        args.num_layers_per_virtual_pipeline_stage,
        args.num_virtual_stages_per_pipeline_rank,
    )


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Fill defaults that depend on other flags, and reject inconsistent settings."""
    from megatron.early_exit.parallel import validate_layout

    _positive(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size")
    _validate_run_length(args)
    _validate_training_values(args)
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = default_ffn_hidden_size(args.hidden_size, args.swiglu)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise ConfigError(
            f"--seq-length ({args.seq_length}) exceeds --max-position-embeddings ({args.max_position_embeddings})"
        )
    if args.hidden_size % args.num_attention_heads:
        raise ConfigError(
            f"--hidden-size ({args.hidden_size}) is not divisible by --num-attention-heads ({args.num_attention_heads})"
        )
    if args.group_query_attention:
        if args.num_query_groups is None:
            raise ConfigError("--group-query-attention needs --num-query-groups")
        if args.num_attention_heads % args.num_query_groups:
            raise ConfigError(
                f"--num-attention-heads ({args.num_attention_heads}) is not divisible by --num-query-groups "
                f"({args.num_query_groups})"
            )
    elif args.num_query_groups is not None:
        raise ConfigError("--num-query-groups needs --group-query-attention")
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 cannot be combined")
    if (args.use_rope_scaling or args.rotary_seq_len_interpolation_factor) and args.position_embedding_type != "rope":
        raise ConfigError(
            "--use-rope-scaling and --rotary-seq-len-interpolation-factor need --position-embedding-type rope"
        )
    _validate_exit_tuning_stages(args)

    args.data_parallel_size = validate_layout(world_size, args.tensor_model_parallel_size, _built_stages(args)[1])
    tp = args.tensor_model_parallel_size
    if args.num_attention_heads % tp:
        raise ConfigError(
            f"--num-attention-heads ({args.num_attention_heads}) is not divisible by --tensor-model-parallel-size "
            f"({tp})"
        )
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron-LM: nothing to split
    if args.sequence_parallel and args.seq_length % tp:
        raise ConfigError(
            f"--sequence-parallel needs --seq-length ({args.seq_length}) divisible by --tensor-model-parallel-size "
            f"({tp})"
        )
    if args.num_layers % args.pipeline_model_parallel_size:
        raise ConfigError(
            f"--num-layers ({args.num_layers}) is not divisible by --pipeline-model-parallel-size "
            f"({args.pipeline_model_parallel_size})"
        )

    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size ({args.global_batch_size}) is not divisible by --micro-batch-size "
            f"({args.micro_batch_size}) x data-parallel size ({args.data_parallel_size}) = {per_step}"
        )
    args.num_microbatches = args.global_batch_size // per_step
    _apply_run_length(args)
    _validate_run_control(args)
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr ({args.min_lr}) exceeds --lr ({args.lr})")
    if args.save_interval is not None and args.save is None:
        raise ConfigError("--save-interval needs --save")
    if args.keep_last is not None and args.keep_last < 1:
        raise ConfigError(f"--keep-last must be >= 1, got {args.keep_last}")
    for flag in ("finetune", "no_load_optim", "no_load_rng"):
        if getattr(args, flag) and not args.load:
            raise ConfigError(f"--{flag.replace('_', '-')} needs --load")

    _validate_data_args(args)
    _validate_recompute_args(args)
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer")
    _validate_pipeline_args(args)
    _validate_virtual_pipeline(args)
    _validate_transformer_impl(args)
    if args.use_flash_attn and args.transformer_impl in ("local", "te_standin"):
        raise ConfigError(f"--use-flash-attn needs --transformer-impl transformer_engine, not {args.transformer_impl}")
    EarlyExitConfig.from_flags(vars(args)).validate_against(args.num_layers)


def _validate_recompute_args(args):
    from megatron.early_exit.models.recompute import RecomputeConfig

    layers, stages = _built_stages(args)
    RecomputeConfig.from_flags(vars(args)).validate_layout(
        layers // stages, args.tensor_model_parallel_size, args.sequence_parallel, _virtual_pipeline_chunks(args)
    )


def _positive(args, *names):
    for name in names:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def _validate_training_values(args):
    """Values argparse accepts but a run cannot use: `nan` parses as a float, and an interval
    of 0 would divide by zero at the first step."""
    import math

    _positive(args, "log_interval", "eval_interval")
    for flag in ("lr", "min_lr"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"--{flag.replace('_', '-')} must be finite and >= 0, got {value}")
    for flag in ("hidden_dropout", "attention_dropout"):
        value = getattr(args, flag)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be in [0, 1), got {value}")
    # nan passes every comparison megatron-core and torch make: --clip-grad nan turned clipping off.
    for flag in ("weight_decay", "clip_grad"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"--{flag.replace('_', '-')} must be finite and >= 0, got {value}")
    for flag in ("adam_eps", "init_method_std"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{flag.replace('_', '-')} must be finite and > 0, got {value}")
    for flag in ("adam_beta1", "adam_beta2"):
        value = getattr(args, flag)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be in [0, 1), got {value}")
    _validate_split(args.split)


def _validate_split(split: str) -> None:
    """Up to three finite weights >= 0, not all 0 (megatron-core divides by their sum)."""
    import math

    try:
        weights = [float(part) for part in split.replace("/", ",").split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"--split {split}: give up to three comma-separated weights >= 0 (train,validation,test), "
            "not all 0, e.g. 969,30,1"
        )


def _validate_data_args(args):
    if args.mock_data and args.data_path:
        raise ConfigError("--mock-data and --data-path cannot be combined")
    if not args.mock_data and not args.data_path:
        raise ConfigError("give --data-path (a preprocessed .bin/.idx prefix) or --mock-data")
    if args.tokenizer_type is None:
        if args.mock_data:
            args.tokenizer_type = "NullTokenizer"
            args.vocab_size = args.vocab_size or 1024
        else:
            raise ConfigError("--tokenizer-type is required with --data-path")
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size")
    if args.data_path:
        _validate_blend(args.data_path)


def _validate_blend(data_path: List[str]) -> None:
    """`--data-path A B` or `--data-path 0.3 A 0.7 B`; each prefix must have .bin and .idx."""

    def is_number(s):
        try:
            float(s)
            return True
        except ValueError:
            return False

    weighted = is_number(data_path[0])
    if weighted:
        if len(data_path) % 2 or not all(is_number(w) for w in data_path[0::2]):
            raise ConfigError(f"--data-path with weights must be 'weight prefix' pairs, got {data_path}")
        prefixes = data_path[1::2]
    else:
        prefixes = data_path
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise ConfigError(f"--data-path: {prefix + suffix} does not exist (run tools/preprocess_data.py first)")


def _apply_run_length(args):
    """--train-samples becomes the iterations it takes (batch-size ramp-up included)."""
    _validate_rampup(args)
    if args.train_samples is not None:
        args.train_iters = iterations_for_samples(
            args.train_samples,
            args.rampup_batch_size,
            args.global_batch_size,
            args.micro_batch_size,
            args.data_parallel_size,
        )
        if args.train_iters < 1:
            raise ConfigError(
                f"--train-samples ({args.train_samples}) is less than one --global-batch-size "
                f"({args.global_batch_size})"
            )
    elif args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    TrainingConfig.from_flags(vars(args)).scheduler_steps  # its lengths are consistent


def _validate_run_control(args):
    if args.exit_interval is not None and args.exit_interval < 1:
        raise ConfigError(f"--exit-interval must be >= 1, got {args.exit_interval}")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        raise ConfigError(f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}")
    if args.skip_train and not args.load:
        raise ConfigError("--skip-train needs --load (the checkpoint to evaluate)")
    if args.load_iteration is not None and args.load_iteration < 0:
        raise ConfigError(f"--load-iteration must be >= 0, got {args.load_iteration}")
    if args.load_iteration == 0:
        args.load_iteration = None  # EE-LLM's 0: the latest
    if args.load_iteration is not None and not args.load:
        raise ConfigError("--load-iteration needs --load")
    if not args.wandb_project:
        args.wandb_project = None  # Megatron-LM: an empty project turns wandb off
    p = args.padded_vocab_size
    if p is not None and (p < 1 or p % args.tensor_model_parallel_size):
        raise ConfigError(
            f"--padded-vocab-size ({p}) must be >= 1 and divisible by --tensor-model-parallel-size "
            f"({args.tensor_model_parallel_size})"
        )


def _validate_transformer_impl(args):
    """Refuse --transformer-impl transformer_engine where TE cannot run the model."""
    from megatron.early_exit.models.layer_specs import resolve_transformer_impl
    from megatron.early_exit.parallel import ParallelConfigError, resolve_device

    if args.transformer_impl != TRANSFORMER_ENGINE:
        return
    try:
        device = resolve_device(args.device)
    except ParallelConfigError:
        return  # --device's own error comes when the run starts
    resolve_transformer_impl(args.transformer_impl, device)


# -- run length (batch_schedule.py computes from them) --------------------------


def _validate_run_length(args) -> None:
    """Megatron-LM's rules: one unit per run, ramp-up only by samples."""
    if (args.train_iters is None) == (args.train_samples is None):
        raise ConfigError("give one of --train-iters and --train-samples")
    unit, other = ("samples", "iters") if args.train_samples is not None else ("iters", "samples")
    for name in ("lr_decay", "lr_wsd_decay"):
        if getattr(args, f"{name}_{other}") is not None:
            raise ConfigError(f"--{name.replace('_', '-')}-{other} needs --train-{other} (this run counts {unit})")
    if getattr(args, f"lr_warmup_{other}"):
        raise ConfigError(f"--lr-warmup-{other} needs --train-{other} (this run counts {unit})")
    if args.lr_warmup_fraction is not None:
        if getattr(args, f"lr_warmup_{unit}"):
            raise ConfigError(f"give one of --lr-warmup-fraction and --lr-warmup-{unit}")
        if not 0.0 <= args.lr_warmup_fraction < 1.0:
            raise ConfigError(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
    if args.rampup_batch_size is not None and args.train_samples is None:
        raise ConfigError("--rampup-batch-size needs --train-samples (ramp-up is counted in samples)")
    value = args.train_iters if args.train_samples is None else args.train_samples
    if value < 1:
        raise ConfigError(f"--train-{unit} must be >= 1, got {value}")


def _validate_rampup(args) -> None:
    """--rampup-batch-size START INCREMENT SAMPLES: every batch size on the way must split
    into micro batches of every data-parallel rank."""
    if args.rampup_batch_size is None:
        return
    start, increment, samples = args.rampup_batch_size
    per_step = args.micro_batch_size * args.data_parallel_size
    if start < 1 or increment < 1 or samples < 0:
        raise ConfigError(f"--rampup-batch-size {start} {increment} {samples}: start and increment must be >= 1")
    if start > args.global_batch_size or (args.global_batch_size - start) % increment:
        raise ConfigError(
            f"--rampup-batch-size {start} {increment} {samples}: --global-batch-size "
            f"({args.global_batch_size}) must be start + a multiple of the increment"
        )
    if start % per_step or increment % per_step:
        raise ConfigError(
            f"--rampup-batch-size {start} {increment} {samples}: start and increment must be multiples "
            f"of --micro-batch-size x data-parallel size ({per_step})"
        )


# -- pipeline layout --------------------------------------------------------------


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
    kept = _built_stages(args)[0]
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
    layers, stages = _built_stages(args)
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


def _validate_virtual_pipeline(args):
    """The interleaved schedule: EE-LLM's bubble filling and exit tuning are defined for plain 1F1B."""
    from megatron.early_exit.pipeline.interleaved import VIRTUAL_FLAG, check_num_microbatches

    if _virtual_pipeline_chunks(args) == 1:
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
