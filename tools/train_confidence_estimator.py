"""Train the learned confidence measure (CALM's early-exit classifier) on a frozen model.

    python tools/train_confidence_estimator.py --load runs/quickstart/checkpoints \\
        --data-path runs/quickstart/data/corpus_text_document --seq-length 256 --num-windows 64 \\
        --output runs/quickstart/confidence.safetensors

Every position of the windows gives each exit one example: its hidden state and
distribution, and whether its token equals the final layer's. One logistic classifier per
exit is fit on the first windows and reported on the last --validation-fraction of them.
With --hidden-state-only the file also serves `gated_max_prob` (the classifier decides
whether the exit's vocabulary projection is computed at all). Then decode with
`EarlyExit(measure="learned")`, `--confidence-estimator FILE` on the
server and in tools/calibrate_threshold.py.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--load-iteration", type=int, default=None, help="iteration to load (default: the latest)")
    p.add_argument("--data-path", required=True, help="prefix of a .bin/.idx dataset (tools/preprocess_data.py)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--num-windows", type=int, default=64)
    p.add_argument("--validation-fraction", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=200, help="L-BFGS iterations per exit")
    p.add_argument(
        "--hidden-state-only",
        action="store_true",
        help="classify from the hidden state alone: an exit that does not fire costs no vocabulary projection",
    )
    p.add_argument(
        "--gate-threshold",
        type=float,
        default=0.5,
        help="with --hidden-state-only, for measure gated_max_prob: the score from which an exit's vocabulary "
        "projection is computed",
    )
    p.add_argument("--output", required=True, help="where to write the estimator (.safetensors)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from megatron.early_exit.errors import ConfigError, install_excepthook

    install_excepthook()
    if not 0 < args.gate_threshold < 1:
        raise ConfigError(f"--gate-threshold must be in (0, 1), got {args.gate_threshold}")
    if not 0 <= args.validation_fraction < 1:
        raise ConfigError(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    from megatron.early_exit.confidence_training import collect, evaluate, fit
    from megatron.early_exit.evaluation.perplexity import read_windows
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    initialize_parallel(1, 1)
    model, _, config = load_model(args.load, iteration=args.load_iteration)
    if not config.early_exit.exit_layer_nums:
        raise ConfigError(f"--load {args.load}: the model has no exits")
    if args.seq_length > config.max_position_embeddings:
        raise ConfigError(
            f"--seq-length {args.seq_length} exceeds the model's {config.max_position_embeddings} positions"
        )
    windows = read_windows(args.data_path, args.seq_length, args.num_windows)
    held = int(len(windows) * args.validation_fraction)
    train, valid = windows[: len(windows) - held], windows[len(windows) - held :]
    start = time.perf_counter()
    use_logits = not args.hidden_state_only
    samples = collect(
        model,
        train,
        use_logits=use_logits,
        progress=lambda done: print(
            f"  collected {done}/{len(train)} windows ({done * args.seq_length / (time.perf_counter() - start):.0f} "
            "tokens/s)",
            flush=True,
        ),
    )
    estimator = fit(samples, config.hidden_size, steps=args.steps)
    estimator.gate_threshold = args.gate_threshold
    report = evaluate(estimator, collect(model, valid, use_logits=use_logits) if valid else samples)
    split = "validation" if valid else "training"
    print(f"\n{'exit':>5} {'tokens':>8} {'agreement':>10} {'accuracy':>9} {'log loss':>9}   ({split} windows)")
    for n, r in sorted(report.items()):
        print(f"{n:>5} {r['tokens']:>8} {r['agreement']:>10.3f} {r['accuracy']:>9.3f} {r['log_loss']:>9.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    estimator.save(args.output, {str(n): r for n, r in report.items()})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
