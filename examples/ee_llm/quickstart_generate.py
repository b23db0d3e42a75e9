"""What early exit is for, on the quick start's checkpoint: a continuation with the layer
each token left at, and early-exit decoding's speed and agreement against full depth.

    python examples/ee_llm/quickstart_generate.py --load runs/quickstart/checkpoints
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

PROMPTS = ["def main():\n    ", "import os\n\n\nclass ", "    for name in ", "        if not self."]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--load", required=True)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    p.add_argument("--tensorboard-dir", default=None, help="the run's TensorBoard folder (training losses for --plot)")
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="write the picture: loss per exit, speed against agreement"
    )
    args = p.parse_args()

    import torch

    import megatron.early_exit  # noqa: F401

    # isort: split
    from megatron.early_exit.inference import EarlyExit, FullDepth, generate
    from megatron.early_exit.inference.exit_numbers import exit_numbers
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    torch.set_num_threads(2)
    initialize_parallel(1, 1, device="cpu")
    model, tokenizer, config = load_model(args.load)
    prompts = [tokenizer.tokenize(text) for text in PROMPTS]
    stop = (tokenizer.eod,)
    generate(model, prompts[:1], FullDepth(), 4)  # warm-up
    full = generate(model, prompts, FullDepth(), args.tokens, stop_tokens=stop)

    sample = generate(model, prompts[:1], EarlyExit(threshold=args.thresholds[0]), args.tokens, stop_tokens=stop)
    print(
        f"\nprompt: {PROMPTS[0]!r}   (exits at layers {config.exit_layer_nums} of {config.num_layers}, "
        f"threshold {args.thresholds[0]})"
    )
    print("token                exit layer")
    for token, number in zip(sample.tokens[0][:24], exit_numbers(model, sample.exit_layers[0][:24])):
        label = "full" if number == config.num_layers else f"exit {number}"
        print(f"  {tokenizer.detokenize([token])!r:<20} {number:>2}  {label}")

    print(f"\n{len(prompts)} prompts x {args.tokens} tokens, greedy, one CPU process")
    print(f"{'decoding':<26}{'tokens/s':>10}{'speedup':>9}{'mean layer':>12}{'agreement':>11}")
    print(
        f"{'full depth':<26}{full.decode_tokens_per_second:>10.1f}{1.0:>8.2f}x{full.mean_exit_layer:>12.2f}{1.0:>11.3f}"
    )
    rows = [("full depth", 1.0, 1.0)]
    best = (0.0, None)
    for threshold in args.thresholds:
        run = generate(model, prompts, EarlyExit(threshold=threshold), args.tokens, stop_tokens=stop)
        same = sum(a == b for x, y in zip(run.tokens, full.tokens) for a, b in zip(x, y))
        agreement = same / max(1, sum(len(t) for t in full.tokens))
        speedup = run.decode_tokens_per_second / max(full.decode_tokens_per_second, 1e-9)
        print(
            f"{'early exit @' + str(threshold):<26}{run.decode_tokens_per_second:>10.1f}{speedup:>8.2f}x"
            f"{run.mean_exit_layer:>12.2f}{agreement:>11.3f}"
        )
        rows.append((f"threshold {threshold:g}", speedup, agreement))
        best = max(best, (speedup, run), key=lambda b: b[0])
    print(
        "agreement: share of positions where early exit chose full depth's token (a first difference "
        "changes the rest of the row)"
    )
    if args.plot:
        from quickstart_plot import training_curves, write_png

        curves = training_curves(args.tensorboard_dir) if args.tensorboard_dir else {}
        write_png(
            args.plot,
            curves,
            rows,
            f"quick start: {config.num_layers} layers, exits after layers "
            f"{', '.join(map(str, config.exit_layer_nums))}",
        )
        print(f"picture: {args.plot}")
    speedup, run = best
    print(
        f"early exit is {speedup:.2f}x full depth at best"
        + (
            ""
            if speedup > 1
            else f": why not: tokens leave at layer {run.mean_exit_layer:.2f} of {config.num_layers} on "
            f"average, too late to pay for testing {len(config.exit_layer_nums)} exits (each projects onto the "
            f"{model.vocab_size}-token vocabulary for every token it keeps) on a model this small and briefly trained; "
            "docs/early_exit_decoding.md shows what does pay"
        )
    )


if __name__ == "__main__":
    main()
