"""EE-LLM's name and flags for adding exits to a checkpoint (its
examples/ee_tuning/convert/add_exit_layers.sh calls this file): the same work as
tools/checkpoint/add_exits.py, on checkpoints of this project (convert a Hugging Face model
with convert_hf.py, an EE-LLM or Megatron-LM one with convert_megatron.py, first).

    python tools/checkpoint/checkpoint_converter.py --load-dir CKPT --save-dir CKPT_EE --load-iteration 1 \\
        --use-exit-norm --use-exit-mlp --conversion-type add-exit --add-exit-layer-nums 5 10 15 20
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def translate(argv=None):
    """add_exits.py's flags for EE-LLM's."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True)
    p.add_argument("--load-iteration", type=int, default=None)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--conversion-type", choices=["exit-position", "add-exit"], default="add-exit")
    p.add_argument("--target-exit-position", choices=["pre", "post"], default="post")
    p.add_argument("--add-exit-layer-nums", type=int, nargs="+", default=[])
    p.add_argument("--use-exit-mlp", action="store_true")
    p.add_argument("--use-exit-block", action="store_true")
    p.add_argument("--use-exit-norm", action="store_true")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--init-method-std", type=float, default=0.02)
    p.add_argument("--megatron-path", default=None, help="accepted for EE-LLM's scripts; not used")
    args = p.parse_args(argv)
    if args.conversion_type != "add-exit":
        p.error(
            "--conversion-type exit-position is not provided: add the exits with --pre-exit instead "
            "(tools/checkpoint/add_exits.py --pre-exit)"
        )
    if not args.add_exit_layer_nums:
        p.error("--add-exit-layer-nums: give the layers that get an exit")
    out = ["--load", args.load_dir, "--save", args.save_dir, "--exit-layer-nums", *map(str, args.add_exit_layer_nums)]
    out += ["--iteration", str(args.load_iteration)] if args.load_iteration is not None else []
    out += [
        f"--{name}"
        for name in ("use-exit-mlp", "use-exit-block", "use-exit-norm", "random-init")
        if getattr(args, name.replace("-", "_"))
    ]
    out += ["--pre-exit"] if args.target_exit_position == "pre" else []
    out += ["--init-method-std", str(args.init_method_std)] if args.random_init else []
    return out


if __name__ == "__main__":  # dist_checkpointing's save re-imports __main__ in a helper process
    import add_exits

    add_exits.main(translate())
