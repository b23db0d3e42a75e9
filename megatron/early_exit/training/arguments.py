"""Command-line arguments: Megatron-LM's names and meanings, plus EE-LLM's early-exit flags.

`parse_args` parses and validates; every error names the flag and the value. The
builders below turn the namespace into megatron-core configs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


from megatron.early_exit.config import CURRICULA, LAYER_DROPOUT_STYLES, WARMUP_STYLES, EarlyExitConfig
from megatron.early_exit.errors import ConfigError
from megatron.early_exit.tokenizers import TOKENIZER_TYPES
from megatron.early_exit.models.layer_specs import TRANSFORMER_ENGINE, TRANSFORMER_IMPLS



def _model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default --seq-length")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"), default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None,
                   help="linear RoPE position interpolation: positions are divided by this factor")
    g.add_argument("--use-rope-scaling", action="store_true", help="Llama 3.x RoPE frequency scaling")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0, help="factor of --use-rope-scaling")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default=None,
                   help="layer modules: transformer_engine (needs TE and a CUDA device) or local; default: TE when the "
                        "target device is CUDA and TE imports. te_standin: TE's module layout in plain PyTorch (CPU tests). "
                        "Checkpoints load into any of them")


def _training_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro batch x data-parallel size")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"), default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--initial-loss-scale", type=float, default=2**32)
    g.add_argument("--seed", type=int, default=1234)


def _parallel_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g.add_argument("--disable-gloo-process-groups", dest="enable_gloo_process_groups", action="store_false",
                   default=None, help="do not create megatron-core's gloo groups (by default they exist on CPU only)")


def _data_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None, help="prefixes, or weight prefix pairs for a blend")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")


def _logging_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)


def _checkpoint_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last", type=int, default=None, help="keep only the newest N checkpoints under --save")
    g.add_argument("--finetune", action="store_true", help="load weights only; start at iteration 0")
    g.add_argument("--no-load-optim", action="store_true", help="do not load optimizer and scheduler state")
    g.add_argument("--no-load-rng", action="store_true", help="do not load RNG states")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take model, tokenizer and exit flags from the --load checkpoint (flags given here win)")


def add_exit_structure_args(g) -> None:
    """The flags that shape an exit head (also read by tools/checkpoint/add_exits.py)."""
    for flag in ("--use-exit-norm", "--use-exit-mlp", "--use-exit-block", "--untie-exit-output-weights", "--pre-exit"):
        g.add_argument(flag, action="store_true")


def _early_exit_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("early exit")
    g.add_argument("--exit-layer-nums", type=int, nargs="*", default=[])
    g.add_argument("--exit-layer-weight", type=float, nargs="*", default=None)
    g.add_argument("--exit-layer-weight-init", type=float, nargs="*", default=None)
    g.add_argument("--exit-layer-weight-warmup-iters", type=int, default=0)
    g.add_argument("--exit-layer-weight-warmup-style", choices=WARMUP_STYLES, default="linear")
    g.add_argument("--exit-layer-temperature", type=float, nargs="*", default=None)
    add_exit_structure_args(g)
    g.add_argument("--use-dynamic-exit-layer-weight", action="store_true")
    g.add_argument("--fill-explicit-bubbles", action="store_true")
    g.add_argument("--num-fill-warmup-microbatches", type=int, default=None)
    g.add_argument("--num-fill-cooldown-microbatches", type=int, default=None)
    g.add_argument("--backward-forward-ratio", type=float, default=2.0)
    g.add_argument("--tune-exit", action="store_true")
    g.add_argument("--tune-exit-pipeline-parallel-size", type=int, default=None,
                   help="with --tune-exit, build and run only the first k pipeline stages (default: all)")
    g.add_argument("--layer-dropout-max", type=float, default=0.0, help="LayerSkip layer dropout at the last layer")
    g.add_argument("--layer-dropout-style", choices=LAYER_DROPOUT_STYLES, default="linear")
    g.add_argument("--exit-curriculum", choices=CURRICULA, default="none")
    g.add_argument("--exit-curriculum-rotation", type=int, default=2)
    g.add_argument("--exit-curriculum-iters", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_early_exit_gpt.py",
        description="Pretrain an early-exit GPT model on megatron-core (launch with torchrun).",
        allow_abbrev=False,
    )
    for add in (_model_args, _training_args, _parallel_args, _data_args, _logging_args, _checkpoint_args, _early_exit_args):
        add(p)
    return p


def parse_args(argv: Optional[List[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse and validate. `world_size` defaults to torchrun's WORLD_SIZE."""
    parser = build_parser()
    _apply_checkpoint_args(parser, argv)
    args = parser.parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_args(args, world_size)
    return args


def checkpoint_arg_names() -> tuple:
    """Flags --use-checkpoint-args takes from the checkpoint (Megatron-LM's: the model's
    description, its tokenizer and sequence length; plus the exits' structure and per-exit
    lists), named by the descriptions' own fields."""
    from megatron.early_exit.models.model_config import ModelConfig

    backbone = [k for k in ModelConfig.backbone_fields() if k not in _NOT_FLAGS]
    tokenizer = ["tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size"]
    exits = list(EarlyExitConfig.STRUCTURE_FIELDS) + ["exit_layer_weight", "exit_layer_temperature"]
    return tuple(backbone + ["group_query_attention", "seq_length"] + tokenizer + exits)


# ModelConfig fields that are no flags of their own, or that a run chooses for itself.
_NOT_FLAGS = ("padded_vocab_size", "params_dtype", "first_stages_only", "hidden_dropout", "attention_dropout",
              "init_method_std")


def _apply_checkpoint_args(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> None:
    """--use-checkpoint-args: the checkpoint's stored flags become the defaults (and
    required flags optional); flags on the command line still win."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--use-checkpoint-args", action="store_true")
    pre.add_argument("--load", default=None)
    known, _ = pre.parse_known_args(argv)
    if not known.use_checkpoint_args:
        return
    if not known.load:
        raise ConfigError("--use-checkpoint-args needs --load")
    from megatron.early_exit.training.checkpointing import read_args

    saved = read_args(known.load)
    # The checkpoint's value, before validation filled derived defaults, is what it was trained with.
    values = {k: saved[k] for k in checkpoint_arg_names() if k in saved}
    if "--exit-layer-nums" in (argv if argv is not None else sys.argv[1:]):
        values.pop("exit_layer_weight", None)  # per-exit lists follow the exits given now
        values.pop("exit_layer_temperature", None)
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:
            action.required = False


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Fill defaults that depend on other flags, and reject inconsistent settings."""
    from megatron.early_exit.parallel import validate_layout

    _positive(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "train_iters")
    _validate_training_values(args)
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise ConfigError(f"--seq-length ({args.seq_length}) exceeds --max-position-embeddings ({args.max_position_embeddings})")
    if args.hidden_size % args.num_attention_heads:
        raise ConfigError(f"--hidden-size ({args.hidden_size}) is not divisible by --num-attention-heads ({args.num_attention_heads})")
    if args.group_query_attention:
        if args.num_query_groups is None:
            raise ConfigError("--group-query-attention needs --num-query-groups")
        if args.num_attention_heads % args.num_query_groups:
            raise ConfigError(f"--num-attention-heads ({args.num_attention_heads}) is not divisible by --num-query-groups ({args.num_query_groups})")
    elif args.num_query_groups is not None:
        raise ConfigError("--num-query-groups needs --group-query-attention")
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 cannot be combined")
    if (args.use_rope_scaling or args.rotary_seq_len_interpolation_factor) and args.position_embedding_type != "rope":
        raise ConfigError("--use-rope-scaling and --rotary-seq-len-interpolation-factor need --position-embedding-type rope")
    _apply_exit_tuning_stages(args)

    args.data_parallel_size = validate_layout(world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    tp = args.tensor_model_parallel_size
    if args.num_attention_heads % tp:
        raise ConfigError(f"--num-attention-heads ({args.num_attention_heads}) is not divisible by --tensor-model-parallel-size ({tp})")
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron-LM: nothing to split
    if args.sequence_parallel and args.seq_length % tp:
        raise ConfigError(f"--sequence-parallel needs --seq-length ({args.seq_length}) divisible by --tensor-model-parallel-size ({tp})")
    if args.num_layers % args.pipeline_model_parallel_size:
        raise ConfigError(
            f"--num-layers ({args.num_layers}) is not divisible by --pipeline-model-parallel-size ({args.pipeline_model_parallel_size})"
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
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters and args.lr_warmup_iters >= args.lr_decay_iters:
        raise ConfigError(f"--lr-warmup-iters ({args.lr_warmup_iters}) must be smaller than --lr-decay-iters ({args.lr_decay_iters})")
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
    _validate_pipeline_args(args)
    _validate_transformer_impl(args)
    build_early_exit_config(args).validate_against(args.num_layers)


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


def _apply_exit_tuning_stages(args):
    """--tune-exit-pipeline-parallel-size k: keep only the first k of the p stages, i.e.
    run a model of the first L*k/p layers on k stages (layer numbers unchanged)."""
    k, p = args.tune_exit_pipeline_parallel_size, args.pipeline_model_parallel_size
    if k is None:
        return
    if not args.tune_exit:
        raise ConfigError("--tune-exit-pipeline-parallel-size needs --tune-exit")
    if not 1 <= k <= p:
        raise ConfigError(f"--tune-exit-pipeline-parallel-size ({k}) must be in 1..--pipeline-model-parallel-size ({p})")
    if args.num_layers % p:
        raise ConfigError(f"--num-layers ({args.num_layers}) is not divisible by --pipeline-model-parallel-size ({p})")
    kept = args.num_layers // p * k
    beyond = [n for n in args.exit_layer_nums if n > kept]
    if beyond:
        raise ConfigError(
            f"--exit-layer-nums {beyond} lie beyond the first {k} of {p} stages (layers 1..{kept}) "
            "kept by --tune-exit-pipeline-parallel-size"
        )
    args.num_layers, args.pipeline_model_parallel_size = kept, k


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


def build_early_exit_config(args) -> EarlyExitConfig:
    """The exits the flags describe (their names are EarlyExitConfig's fields)."""
    return EarlyExitConfig.from_flags(vars(args))
