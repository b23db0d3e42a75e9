"""Rewrite a checkpoint from another parallel layout, offline.

    python tools/checkpoint/reshard.py --load SRC --save DST \
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2 [--weights-only]

Our checkpoints (megatron-core torch_dist) are layout-independent: `--load` already
reshards at start-up, so a job at a new layout can load SRC directly. This tool is for
what that does not cover: checking on a small CPU machine that a checkpoint loads into
the target layout (model and optimizer, every rank) before a large job is queued,
writing it as saved from that layout, and dropping the optimizer state for release or
serving (`--weights-only`). RNG states do not carry over between layouts.

It starts target TP x PP processes itself (torchrun, gloo on CPU); run it plainly.
After writing, every rank reads DST back and compares its weights bit for bit.
"""

import argparse
import os
import re
import subprocess
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="source checkpoint directory (a --save directory)")
    p.add_argument(
        "--load-iteration",
        "--ckpt-step",
        dest="load_iteration",
        type=int,
        default=None,
        help="iteration of --load to rewrite (default, or 0: the latest)",
    )
    p.add_argument("--save", required=True, help="destination directory")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--weights-only", action="store_true", help="write model weights and flags only")
    a = p.parse_args(argv)
    from megatron.early_exit.errors import ConfigError

    for flag in ("target_tensor_parallel_size", "target_pipeline_parallel_size"):
        if getattr(a, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    a.load_iteration = a.load_iteration or None
    if a.load_iteration is not None:  # a missing one is named here, before any process starts
        from megatron.early_exit.checkpoint.reader import resolve

        resolve(a.load, a.load_iteration, checksums=False)
    if os.path.abspath(a.load) == os.path.abspath(a.save):
        raise ConfigError("--save must differ from --load")
    return a


def target_args(a):
    """The stored training flags, re-laid out for the target (no data needed)."""
    from megatron.early_exit.checkpoint.reader import resolve
    from megatron.early_exit.training.arguments import stored_args

    args = stored_args(
        resolve(a.load, a.load_iteration), a.target_tensor_parallel_size, a.target_pipeline_parallel_size
    )
    args.load, args.save, args.load_iteration = a.load, a.save, a.load_iteration
    args.finetune, args.no_load_optim, args.no_load_rng = False, a.weights_only, True
    return args


def checked_target_config(a):
    """The run configuration of target_args, refused in one line when the checkpoint cannot
    take the target layout."""
    from megatron.early_exit.training.arguments import build_run_config

    args = target_args(a)
    if args.num_layers % args.pipeline_model_parallel_size:
        from megatron.early_exit.errors import ConfigError

        raise ConfigError(
            f"--target-pipeline-parallel-size {args.pipeline_model_parallel_size} does not divide "
            f"the checkpoint's {args.num_layers} layers"
        )
    return build_run_config(args)


def run_rank(a):
    import torch

    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.checkpoint.reader import load_weights, read_model_config, resolve
    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.parallel import initialize_parallel
    from megatron.early_exit.pipeline.placement import tied_embedding_stages
    from megatron.early_exit.training import checkpointing
    from megatron.early_exit.training.trainer import build_model, build_optimizer, wrap_model

    config = checked_target_config(a)
    pp = config.parallel.pipeline_model_parallel_size
    ctx = initialize_parallel(
        config.parallel.tensor_model_parallel_size,
        pp,
        seed=config.training.seed,
        device="cpu",
        tied_embedding_stages=tied_embedding_stages(
            config.early_exit, config.model.num_layers, pp, not config.model.untie_embeddings_and_output_weights
        ),
    )
    vocab = read_model_config(resolve(a.load, a.load_iteration)).padded_vocab_size
    model = build_model(config, ctx.device, vocab)
    model = wrap_model(model, config)
    optimizer, scheduler = build_optimizer(model, config, ctx.gloo_process_groups)
    iteration, consumed = checkpointing.load(config, model, optimizer, scheduler)
    if a.weights_only:
        path = save_weights(a.save, config.flags, model, iteration)
    else:
        path = checkpointing.save(config, model, optimizer, scheduler, iteration, consumed)
    check = build_model(config, ctx.device, vocab)
    load_weights(path, check)
    for (name, want), (_, got) in zip(model.module.state_dict().items(), check.state_dict().items()):
        if torch.is_tensor(want) and not torch.equal(want, got):
            raise CheckpointError(f"{path}: {name} reads back differently on rank {ctx.rank}")
    torch.distributed.barrier()
    if ctx.rank == 0:
        print(
            f"resharded {a.load} -> {path} for TP={config.parallel.tensor_model_parallel_size} "
            f"PP={pp}; every rank read its weights back identically",
            flush=True,
        )


def main(argv=None):
    import megatron.early_exit  # noqa: F401  (version check, CPU adapter)

    # isort: split
    from megatron.early_exit.errors import install_excepthook

    install_excepthook()
    a = parse(argv)
    if "WORLD_SIZE" in os.environ:
        return run_rank(a)
    checked_target_config(a)  # what can be refused is refused here, before any process starts
    nproc = a.target_tensor_parallel_size * a.target_pipeline_parallel_size
    print(
        f"starting {nproc} processes (TP={a.target_tensor_parallel_size} x PP={a.target_pipeline_parallel_size})",
        flush=True,
    )
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        os.path.abspath(__file__),
    ] + (argv if argv is not None else sys.argv[1:])
    proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
    sys.exit(_report(proc.returncode, proc.stderr))


def _report(returncode: int, stderr: str) -> int:
    """The workers' stderr; when they failed, only their `error:` lines (once each) instead of
    torchrun's ChildFailedError report around them, unless there are none."""
    errors = [re.sub(r"^\[rank\d+\]: ", "", line) for line in stderr.splitlines()]
    errors = list(dict.fromkeys(line for line in errors if line.startswith("error: ")))
    sys.stderr.write("\n".join(errors) + "\n" if returncode and errors else stderr)
    return 1 if returncode else 0


if __name__ == "__main__":
    main()
