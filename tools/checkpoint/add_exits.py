"""EE-Tuning, stage 1: add exit heads to a trained checkpoint (one with no exits, or other ones).

    python tools/checkpoint/add_exits.py --load ckpt/llama2-7b --save ckpt/llama2-7b-ee \\
        --exit-layer-nums 9 17 --pre-exit --use-exit-norm --untie-exit-output-weights

Exits are initialised by copying (default; EE-Tuning's choice): the exit norm from the
final norm, an untied exit output layer from the final output layer (or the word
embedding when the model ties them), an exit MLP from its layer's MLP, an exit block from
the last layer; or randomly with --random-init (--init-method-std, --seed). Exits that
already exist at the same layer with the same structure keep their weights.

Stage 2 trains only the exits, the backbone frozen:
    torchrun ... pretrain_early_exit_gpt.py <model flags> <the same exit flags> \\
        --load ckpt/llama2-7b-ee --finetune --tune-exit ...

A run with --tune-exit-pipeline-parallel-size saves only the first pipeline stages; put its
tuned exits back on the whole model with
    python tools/checkpoint/add_exits.py --load ckpt/llama2-7b-ee --exits-from ckpt/tuned --save ckpt/llama2-7b-ee-tuned
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def parse_args(argv=None):
    from megatron.early_exit.training.arguments import add_exit_structure_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (ours: convert_hf.py or --save output)")
    p.add_argument("--save", required=True, help="output checkpoint directory (must not exist, or be empty)")
    p.add_argument(
        "--iteration",
        "--load-iteration",
        "--ckpt-step",
        dest="iteration",
        type=int,
        default=None,
        help="iteration of --load to read (default, or 0: the latest)",
    )
    p.add_argument(
        "--exits-from",
        default=None,
        help="take the exits (structure and weights) from this checkpoint instead, e.g. one tuned with "
        "--tune-exit-pipeline-parallel-size, which holds only the first stages",
    )
    p.add_argument("--exit-layer-nums", type=int, nargs="+", default=None, help="layers (1-based) that get an exit")
    p.add_argument("--exit-layer-weight", type=float, nargs="*", default=None, help="loss weight per exit (stored)")
    p.add_argument("--exit-layer-temperature", type=float, nargs="*", default=None)
    add_exit_structure_args(p)
    p.add_argument("--random-init", action="store_true", help="random exits instead of copies")
    p.add_argument("--init-method-std", type=float, default=None, help="with --random-init (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=None, help="with --random-init (default: the checkpoint's)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.iteration = args.iteration or None
    from megatron.early_exit.errors import install_excepthook

    install_excepthook()
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.hf.add_exits import add_exits
    from megatron.early_exit.parallel import initialize_parallel

    initialize_parallel(1, 1)
    exits = {key: getattr(args, key) for key in EarlyExitConfig.flag_names() if hasattr(args, key)}
    report = add_exits(
        args.load,
        args.save,
        exits,
        copy_init=not args.random_init,
        seed=args.seed,
        init_method_std=args.init_method_std,
        iteration=args.iteration,
        exits_from=args.exits_from,
    )
    for layer in sorted(set(report.kept) | set(report.initialised)):
        how = "kept from the checkpoint" if layer in report.kept else report.initialised[layer]
        copied = sorted(
            {src.rsplit(".", 1)[0] for name, src in report.sources.items() if name.startswith(f"exits.{layer}.")}
        )
        print(f"exit {layer}: {how}" + (f" ({', '.join(copied)})" if copied else ""))
    print(f"wrote {report.path}: train the exits with --load {report.path} --finetune --tune-exit and its exit flags")


if __name__ == "__main__":  # dist_checkpointing's save re-imports __main__ in a helper process
    main()
