"""Command-line arguments: Megatron-LM's names and meanings, plus EE-LLM's early-exit flags.

`parse_args` parses and validates (argument_checks.py; every error names the flag and the
value) into an argparse namespace; `build_run_config` turns that, once, into the typed
RunConfig (run_config.py) that `pretrain` and everything below it take. The namespace
stays here and in the entry points.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from megatron.early_exit.config import CURRICULA, LAYER_DROPOUT_STYLES, WARMUP_STYLES, EarlyExitConfig
from megatron.early_exit.errors import ConfigError
from megatron.early_exit.models.layer_specs import TRANSFORMER_IMPLS
from megatron.early_exit.tokenizers import TOKENIZER_TYPES
from megatron.early_exit.training.argument_checks import validate_args
from megatron.early_exit.training.run_config import RunConfig


def _model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument(
        "--ffn-hidden-size",
        type=int,
        default=None,
        help="default 4 x hidden size; with --swiglu 2/3 of that, a multiple of 64 (Megatron-LM's)",
    )
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
    g.add_argument(
        "--rotary-seq-len-interpolation-factor",
        type=float,
        default=None,
        help="linear RoPE position interpolation: positions are divided by this factor",
    )
    g.add_argument("--use-rope-scaling", action="store_true", help="Llama 3.x RoPE frequency scaling")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0, help="factor of --use-rope-scaling")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument(
        "--add-qkv-bias", action="store_true", help="biases on the QKV projection even with --disable-bias-linear"
    )
    g.add_argument("--qk-layernorm", action="store_true", help="norm each query and key head (--normalization's type)")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument(
        "--padded-vocab-size",
        type=int,
        default=None,
        help="rows of the embedding and output layer (overrides the padding of --make-vocab-size-divisible-by)",
    )
    g.add_argument(
        "--query-key-layer-scaling",
        dest="apply_query_key_layer_scaling",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="scale Q.K^T by 1/layer number (softmax in fp32; same result, for fp16 range)",
    )
    g.add_argument(
        "--use-flash-attn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="flash attention through megatron-core's attention backend (needs a CUDA device, Transformer "
        "Engine and flash-attn); --no-use-flash-attn after it turns it off, e.g. to run a GPU script on CPU",
    )
    g.add_argument(
        "--transformer-impl",
        choices=TRANSFORMER_IMPLS,
        default=None,
        help="layer modules: transformer_engine (needs TE and a CUDA device) or local; default: TE when the "
        "target device is CUDA and TE imports. te_standin: TE's module layout in plain PyTorch (CPU tests). "
        "Checkpoints load into any of them",
    )


def _training_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro batch x data-parallel size")
    g.add_argument("--train-iters", type=int, default=None, help="optimizer steps (or give --train-samples)")
    g.add_argument("--train-samples", type=int, default=None, help="samples to train on; LR flags then count samples")
    g.add_argument(
        "--rampup-batch-size",
        type=int,
        nargs=3,
        default=None,
        metavar=("START", "INCREMENT", "SAMPLES"),
        help="global batch size from START up by INCREMENT over SAMPLES samples (with --train-samples)",
    )
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument(
        "--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"), default="linear"
    )
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-samples", type=int, default=None, help="default --train-samples")
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="warm-up as a fraction of the LR decay")
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
    g.add_argument("--exit-interval", type=int, default=None, help="save and stop after an iteration divisible by N")
    g.add_argument("--exit-duration-in-mins", type=float, default=None, help="save and stop after this many minutes")
    g.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="on SIGTERM finish the iteration, save, and exit with status 0",
    )
    g.add_argument("--skip-train", action="store_true", help="with --load: evaluate the checkpoint only")


def _parallel_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=None,
        help="interleaved pipeline: layers of each model chunk (v = layers / (PP x N) chunks per stage)",
    )
    g.add_argument(
        "--num-virtual-stages-per-pipeline-rank",
        type=int,
        default=None,
        help="interleaved pipeline: model chunks per stage (the other way to give v)",
    )
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g.add_argument(
        "--disable-gloo-process-groups",
        dest="enable_gloo_process_groups",
        action="store_false",
        default=None,
        help="do not create megatron-core's gloo groups (by default they exist on CPU, and with "
        "--use-distributed-optimizer for its memory-efficient checkpoint exchange)",
    )


def _recompute_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("activation recomputation")
    g.add_argument(
        "--recompute-granularity",
        choices=("full", "selective"),
        default=None,
        help="full: recompute whole layers (see --recompute-method); selective: core attention only",
    )
    g.add_argument(
        "--recompute-method",
        choices=("uniform", "block"),
        default=None,
        help="uniform: chunks of --recompute-num-layers layers; block: the first --recompute-num-layers "
        "layers of each pipeline stage",
    )
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-activations", action="store_true", help="the same as --recompute-granularity selective")
    g.add_argument(
        "--distribute-saved-activations",
        action="store_true",
        help="split recomputed layers' saved inputs across the tensor-parallel group",
    )
    g.add_argument(
        "--recompute-exit-heads",
        action="store_true",
        help="recompute each exit head (its vocabulary-sized logits) in backward",
    )


def _distributed_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("distributed communication")
    g.add_argument(
        "--overlap-grad-reduce", action="store_true", help="reduce gradient buckets during backward (megatron-core DDP)"
    )
    g.add_argument(
        "--overlap-param-gather",
        action="store_true",
        help="with --use-distributed-optimizer, gather updated parameters during the next forward",
    )


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
    g.add_argument(
        "--timing-log-level",
        type=int,
        choices=(0, 1, 2),
        default=0,
        help="0: iteration time; 1: also forward-backward and optimizer; 2: also forward, exit losses, "
        "backward and pipeline communication per microbatch (synchronises the device)",
    )
    g.add_argument(
        "--timing-log-option",
        choices=("max", "minmax", "all"),
        default="minmax",
        help="timers over ranks: the max, min and max, or every rank's",
    )
    g.add_argument(
        "--log-timers-to-tracker",
        "--log-timers-to-tensorboard",
        dest="log_timers_to_tracker",
        action="store_true",
        help="write the timers to TensorBoard and wandb",
    )
    g.add_argument("--wandb-project", default=None, help="log to Weights & Biases under this project (empty: off)")
    g.add_argument("--wandb-group", default=None)
    g.add_argument("--wandb-exp-name", default=None, help="the run's name")
    g.add_argument("--wandb-save-dir", default="", help="where wandb writes the run (default: <--save>/wandb)")


def _checkpoint_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument(
        "--load-iteration",
        "--ckpt-step",
        dest="load_iteration",
        type=int,
        default=None,
        help="load this iteration of --load (default, or 0: the latest)",
    )
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last", type=int, default=None, help="keep only the newest N checkpoints under --save")
    g.add_argument("--finetune", action="store_true", help="load weights only; start at iteration 0")
    g.add_argument("--no-load-optim", action="store_true", help="do not load optimizer and scheduler state")
    g.add_argument("--no-load-rng", action="store_true", help="do not load RNG states")
    g.add_argument(
        "--use-checkpoint-args",
        action="store_true",
        help="take model, tokenizer and exit flags from the --load checkpoint (flags given here win)",
    )


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
    g.add_argument(
        "--fill-placement",
        choices=("idle", "fixed"),
        default="idle",
        help="idle: fill items only where 1F1B idles (no slower iteration; the counts cap them); "
        "fixed: EE-LLM's counts at fixed points",
    )
    g.add_argument("--backward-forward-ratio", type=float, default=2.0)
    g.add_argument("--tune-exit", action="store_true")
    g.add_argument(
        "--tune-exit-pipeline-parallel-size",
        type=int,
        default=None,
        help="with --tune-exit, build and run only the first k pipeline stages (default: all)",
    )
    g.add_argument("--layer-dropout-max", type=float, default=0.0, help="LayerSkip layer dropout at the last layer")
    g.add_argument("--layer-dropout-style", choices=LAYER_DROPOUT_STYLES, default="linear")
    g.add_argument("--exit-curriculum", choices=CURRICULA, default="none")
    g.add_argument("--exit-curriculum-rotation", type=int, default=2)
    g.add_argument("--exit-curriculum-iters", type=int, default=0)
    g.add_argument(
        "--exit-distill-weight",
        type=float,
        default=0.0,
        help="self-distillation: each exit's loss is (1-a) CE + a T^2 KL(final || exit), a in [0, 1] "
        "(1: the exits learn the final layer only)",
    )
    g.add_argument("--exit-distill-temperature", type=float, default=1.0)
    g.add_argument("--exit-distill-warmup-iters", type=int, default=0, help="a rises from 0 over this many iterations")
    g.add_argument("--exit-distill-warmup-style", choices=WARMUP_STYLES, default="linear")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_early_exit_gpt.py",
        description="Pretrain an early-exit GPT model on megatron-core (launch with torchrun).",
        allow_abbrev=False,
    )
    for add in (
        _model_args,
        _training_args,
        _parallel_args,
        _recompute_args,
        _distributed_args,
        _data_args,
        _logging_args,
        _checkpoint_args,
        _early_exit_args,
    ):
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


def build_run_config(args: argparse.Namespace) -> RunConfig:
    """The typed configuration of parsed (and validated) flags."""
    return RunConfig.from_flags(vars(args))


def parse_run_config(argv: Optional[List[str]] = None, world_size: Optional[int] = None) -> RunConfig:
    """`parse_args`, then the typed configuration: what `pretrain` takes."""
    return build_run_config(parse_args(argv, world_size))


def build_early_exit_config(args: argparse.Namespace) -> EarlyExitConfig:
    """The exits the flags describe (their names are EarlyExitConfig's fields)."""
    return EarlyExitConfig.from_flags(vars(args))


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
_NOT_FLAGS = (
    "padded_vocab_size",
    "params_dtype",
    "first_stages_only",
    "hidden_dropout",
    "attention_dropout",
    "init_method_std",
)


def _apply_checkpoint_args(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> None:
    """--use-checkpoint-args: the checkpoint's stored flags become the defaults (and
    required flags optional); flags on the command line still win."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--use-checkpoint-args", action="store_true")
    pre.add_argument("--load", default=None)
    pre.add_argument("--load-iteration", "--ckpt-step", dest="load_iteration", type=int, default=None)
    known, _ = pre.parse_known_args(argv)
    if not known.use_checkpoint_args:
        return
    if not known.load:
        raise ConfigError("--use-checkpoint-args needs --load")
    from megatron.early_exit.checkpoint.reader import read_args

    saved = read_args(known.load, known.load_iteration or None)
    # The checkpoint's value, before validation filled derived defaults, is what it was trained with.
    values = {k: saved[k] for k in checkpoint_arg_names() if k in saved}
    if "--exit-layer-nums" in (argv if argv is not None else sys.argv[1:]):
        values.pop("exit_layer_weight", None)  # per-exit lists follow the exits given now
        values.pop("exit_layer_temperature", None)
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:
            action.required = False


def stored_args(path: str, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1):
    """The training flags saved with the checkpoint at `path`, defaults filled for newer
    flags, re-laid out for these TP and PP sizes (no sequence parallelism): a namespace
    for tools that rebuild a training run (reshard)."""
    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.checkpoint.reader import read_common

    saved = read_common(path)["args"]
    args = argparse.Namespace(**{a.dest: a.default for a in build_parser()._actions if a.dest != "help"})
    vars(args).update(saved)
    args.saved_tensor_model_parallel_size = args.tensor_model_parallel_size
    args.tensor_model_parallel_size = tensor_model_parallel_size
    if (
        args.tune_exit_pipeline_parallel_size is not None
    ):  # its flags describe the whole model, its weights the first stages
        raise CheckpointError(
            f"{path} holds only the first {args.tune_exit_pipeline_parallel_size} of "
            f"{args.pipeline_model_parallel_size} pipeline stages (exit tuning): put its exits back on "
            "the whole model with tools/checkpoint/add_exits.py --exits-from first"
        )
    args.pipeline_model_parallel_size = pipeline_model_parallel_size
    args.sequence_parallel = False
    args.transformer_impl = None  # the layer modules follow the device the run is on
    return args
