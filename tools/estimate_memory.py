"""Memory per rank of a training configuration, before launching it.

    python tools/estimate_memory.py --world-size 16 --gpu-memory-gb 80 [training flags]
    python tools/estimate_memory.py --gpu-memory-gb 80 --script examples/ee_llm/pretrain_early_exit_7B.sh

Takes the flags of pretrain_early_exit_gpt.py (parsed and checked by the same parser;
data, tokenizer and checkpoint paths are not needed and not read) or a launch script of
examples/ee_llm (its flags and world size), and prints one row per pipeline stage:
parameters, gradients, optimizer state, activations of the in-flight microbatches,
recomputation buffer, final and exit logits, transient buffers, the total and its largest
term (see megatron/early_exit/memory.py for what each term counts). With --gpu-memory-gb
it says whether the largest rank fits, keeping a named margin for what the estimate leaves
out (CUDA context, NCCL and cuBLAS buffers, allocator fragmentation).
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Flags naming files the estimate does not read, with the number of values each takes.
_FILE_FLAGS = {
    "--data-path": None,
    "--tokenizer-type": 1,
    "--tokenizer-model": 1,
    "--vocab-file": 1,
    "--merge-file": 1,
    "--load": 1,
    "--save": 1,
    "--save-interval": 1,
    "--tensorboard-dir": 1,
    "--data-cache-path": 1,
}


def parse_tool_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="number of ranks (default: the script's, else --tensor- x --pipeline-model-parallel-size)",
    )
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help="say whether each configuration fits in GPUs this big, with a margin for the CUDA context, "
        "communication buffers and allocator fragmentation",
    )
    p.add_argument("--script", action="append", default=[], help="an examples/ee_llm launch script (repeatable)")
    p.add_argument(
        "--tokenizer-vocab-size",
        type=int,
        default=32000,
        help="vocabulary of the tokenizer the flags name (default: Llama-2's 32000)",
    )
    p.add_argument(
        "--kernels",
        choices=("auto", "local", "transformer_engine"),
        default="auto",
        help="layer modules counted: auto (local on CPU or with --transformer-impl local, else Transformer "
        "Engine with flash attention)",
    )
    return p.parse_known_args(argv)


def strip_file_flags(argv):
    """The training flags without paths, which the estimate needs no file of."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _FILE_FLAGS:
            n = _FILE_FLAGS[argv[i]]
            i += 1
            while i < len(argv) and (n is None or n > 0) and not argv[i].startswith("--"):
                i, n = i + 1, None if n is None else n - 1
            continue
        out.append(argv[i])
        i += 1
    return out


def script_flags(path):
    """(world size, flags) a launch script would run with (its EE_PRINT_ARGS mode)."""
    from megatron.early_exit.errors import ConfigError

    env = dict(os.environ, EE_PRINT_ARGS="1", DATA_PATH="unused", TOKENIZER_MODEL="unused")
    proc = subprocess.run(["bash", path], capture_output=True, text=True, env=env)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or not lines or not lines[0].startswith("WORLD_SIZE="):
        raise ConfigError(f"--script {path}: not a launch script that prints its flags with EE_PRINT_ARGS=1")
    return int(lines[0].split("=")[1]), lines[1:]


def shape_of(argv, world_size, tokenizer_vocab_size=32000, kernels="auto"):
    """(ModelConfig, TrainingShape) of training flags on `world_size` ranks."""
    from megatron.early_exit.memory import TrainingShape
    from megatron.early_exit.models.model_config import padded_vocab_size
    from megatron.early_exit.pipeline.placement import exit_stages
    from megatron.early_exit.pipeline.plan import build_fill_plan, default_num_fill_microbatches
    from megatron.early_exit.training.arguments import parse_run_config

    argv = strip_file_flags(list(argv))
    if "--vocab-size" not in argv:
        argv += ["--vocab-size", str(tokenizer_vocab_size)]
    config = parse_run_config(argv + ["--mock-data"], world_size=world_size)
    parallel, schedule = config.parallel, config.schedule
    vocab = config.data.padded_vocab_size or padded_vocab_size(
        config.model.tokenizer.vocab_size,
        config.model.make_vocab_size_divisible_by,
        parallel.tensor_model_parallel_size,
    )
    model = config.model_config(vocab)
    pp = parallel.pipeline_model_parallel_size
    fill = None
    if schedule.fill_explicit_bubbles:
        default = default_num_fill_microbatches(pp, schedule.backward_forward_ratio)
        pick = lambda n: default if n is None else n  # noqa: E731
        fill = build_fill_plan(
            pp,
            exit_stages(config.early_exit, model.num_layers, pp),
            pick(schedule.num_fill_warmup_microbatches),
            pick(schedule.num_fill_cooldown_microbatches),
            schedule.backward_forward_ratio,
        )
    if kernels == "auto":
        kernels = (
            "local"
            if parallel.device == "cpu" or config.implementation.transformer_impl == "local"
            else "transformer_engine"
        )
    shape = TrainingShape(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=pp,
        data_parallel_size=parallel.data_parallel_size,
        micro_batch_size=config.training.micro_batch_size,
        seq_length=config.data.seq_length,
        num_microbatches=config.num_microbatches,
        sequence_parallel=parallel.sequence_parallel,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        recompute=config.recompute,
        fill=fill,
        kernels=kernels,
        num_model_chunks=config.virtual_pipeline_chunks,
    )
    return model, shape


def _default_world_size(argv):
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--tensor-model-parallel-size", type=int, default=1)
    pre.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    known, _ = pre.parse_known_args(argv)
    return known.tensor_model_parallel_size * known.pipeline_model_parallel_size


def main(argv=None):
    import megatron.early_exit  # noqa: F401  (one-line errors)

    # isort: split
    from megatron.early_exit.memory import estimate, format_table

    tool, rest = parse_tool_args(argv)
    runs = [(path, *script_flags(path)) for path in tool.script]
    if rest or not runs:
        runs.append(("flags", tool.world_size or _default_world_size(rest), rest))
    for name, world_size, flags in runs:
        model, shape = shape_of(flags, tool.world_size or world_size, tool.tokenizer_vocab_size, tool.kernels)
        print(
            f"{name}: {model.num_layers} layers, hidden {model.hidden_size}, exits {model.exit_layer_nums or '-'}; "
            f"TP {shape.tensor_model_parallel_size} PP {shape.pipeline_model_parallel_size}"
            f"{f' x {shape.num_model_chunks} chunks' if shape.num_model_chunks > 1 else ''} "
            f"DP {shape.data_parallel_size}, {shape.num_microbatches} microbatches of {shape.micro_batch_size}, "
            f"{model.params_dtype}, {shape.kernels} kernels (GB = 1e9 bytes)"
        )
        print(format_table(estimate(model, shape), tool.gpu_memory_gb))
        print()


if __name__ == "__main__":
    main()
