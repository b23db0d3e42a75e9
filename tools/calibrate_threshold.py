"""Pick an early-exit threshold: sweep thresholds on your prompts, report speedup against
agreement with full-depth output, and choose the fastest threshold that keeps the
requested agreement (or, with --criterion consistency, CALM's per-token consistency
with the full model).

    python tools/calibrate_threshold.py --load runs/quickstart/checkpoints \\
        --prompts-jsonl prompts.jsonl --min-agreement 0.95 --kv recompute --measure max_prob

Prompts come from a jsonl file (one {"text": ...} per line) and/or --prompt TEXT.
Decoding is greedy, one prompt at a time. Prints a table, then the chosen threshold
(exit status 1 when no threshold keeps the agreement).

With --per-exit, each exit gets its own threshold: for each --targets value, one full-depth
pass over the prompts and their full-depth continuations sets, shallowest exit first, the
lowest threshold at which the tokens leaving there agree with the final layer at that rate;
each set of thresholds is then decoded and timed like a single threshold, and the fastest
that keeps --min-agreement is chosen. --output-json holds its `exit_thresholds`, which
`EarlyExit(exit_thresholds=...)` and the server's `exit_thresholds` request field take.

With --target-consistency D (or --target-agreement D) and --confidence C, thresholds come with
a guarantee instead (CALM's Learn-then-Test, megatron/early_exit/inference/learn_then_test.py):
half the prompts propose per-exit thresholds from conservative to aggressive, the other half
test them in that order (Hoeffding-Bentkus p-values, fixed-sequence testing), and the most
aggressive that passes keeps consistency (agreement) >= D with probability >= C over prompts
drawn like these. --output-json then holds `exit_thresholds`, which the server reads with
--exit-thresholds-file:

    python tools/calibrate_threshold.py --load CKPT --prompts-jsonl prompts.jsonl \
        --target-consistency 0.95 --confidence 0.9 --output-json thresholds.json

--oracle also decodes with an exit test that knows the final layer's token (each token
leaves at the shallowest exit that agrees with it): the speedup no confidence measure can
beat with these exits. Far above the table's best: the measure is what holds early exit
back; near it: the exits are.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (--save of pretrain_early_exit_gpt.py)")
    p.add_argument("--prompts-jsonl", default=None, help="one JSON object per line with the prompt under --json-key")
    p.add_argument("--json-key", default="text")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--max-prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    p.add_argument("--measure", default="max_prob", help="max_prob, margin, entropy, saturation or learned")
    p.add_argument(
        "--confidence-estimator",
        default=None,
        help="for --measure learned: a file of tools/train_confidence_estimator.py",
    )
    p.add_argument("--kv", default="recompute", help="recompute or propagate")
    p.add_argument("--exit-layers", type=int, nargs="+", default=None, help="active exits (default: all)")
    p.add_argument("--min-agreement", type=float, default=0.95)
    p.add_argument(
        "--criterion",
        choices=["agreement", "consistency"],
        default="agreement",
        help="agreement: identical to full-depth output position by position; consistency: each token "
        "is the full model's choice after the same prefix",
    )
    p.add_argument("--repeats", type=int, default=1, help="timings per prompt; the fastest counts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--per-exit", action="store_true", help="a threshold per exit, calibrated for each of --targets")
    p.add_argument(
        "--targets",
        type=float,
        nargs="+",
        default=[0.995, 0.99, 0.98, 0.97, 0.95, 0.9],
        help="with --per-exit: agreement with the final layer of the tokens leaving at each exit",
    )
    p.add_argument(
        "--oracle",
        action="store_true",
        help="also decode with an exit test that knows the final layer's token: the speedup no confidence "
        "measure can beat with these exits (output identical to full depth)",
    )
    p.add_argument(
        "--target-consistency",
        type=float,
        default=None,
        help="Learn-then-Test: keep consistency with full depth >= this, with probability --confidence",
    )
    p.add_argument(
        "--target-agreement",
        type=float,
        default=None,
        help="Learn-then-Test: keep agreement with full-depth output >= this, with probability --confidence",
    )
    p.add_argument("--confidence", type=float, default=0.9, help="with --target-*: 1 - epsilon of the guarantee")
    p.add_argument("--output-json", default=None, help="also write every sweep point and the choice here")
    return p.parse_args()


def read_prompts(args, tokenizer):
    texts = list(args.prompt)
    if args.prompts_jsonl:
        with open(args.prompts_jsonl) as f:
            texts += [json.loads(line)[args.json_key] for line in f if line.strip()]
    texts = texts[: args.max_prompts]
    if not texts:
        from megatron.early_exit.inference import InferenceConfigError

        raise InferenceConfigError("no prompts: give --prompts-jsonl FILE or --prompt TEXT")
    return [tokenizer.tokenize(t) for t in texts]


def main():
    args = parse_args()
    import torch

    from megatron.early_exit.errors import install_excepthook

    install_excepthook()
    from megatron.early_exit.inference import EarlyExit
    from megatron.early_exit.inference.calibration import format_table, oracle_decode, pick_fastest, sweep
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    if args.threads:
        torch.set_num_threads(args.threads)
    initialize_parallel(1, 1)
    model, tokenizer, _ = load_model(args.load, confidence_estimator=args.confidence_estimator)
    prompts = read_prompts(args, tokenizer)
    exits = tuple(args.exit_layers) if args.exit_layers else None
    if args.target_consistency is not None or args.target_agreement is not None:
        sys.exit(guaranteed(model, prompts, args, exits))
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens each, {args.measure} / {args.kv}", flush=True)
    if args.per_exit:
        per_exit = calibrate_per_exit(model, prompts, args, exits)
        labels = [f"target {t}" for t in per_exit]
        strategies = [EarlyExit(2.0, args.measure, args.kv, exits, thresholds) for thresholds in per_exit.values()]
    else:
        labels = [f"threshold {t}" for t in sorted(args.thresholds, reverse=True)]
        strategies = [EarlyExit(t, args.measure, args.kv, exits) for t in sorted(args.thresholds, reverse=True)]
    points = sweep(
        model,
        prompts,
        strategies,
        args.max_new_tokens,
        args.repeats,
        progress=lambda line: print("  " + line, flush=True),
    )
    print("\n" + format_table(points))
    oracle = None
    if args.oracle:
        oracle = oracle_decode(model, prompts, exits, args.max_new_tokens, args.measure, args.repeats)
        print(
            f"\noracle (each token leaves at the shallowest exit that agrees with the final layer, every exit tested): "
            f"{oracle.speedup:.2f}x, mean exit layer {oracle.mean_exit_layer:.2f}, exits take "
            + ", ".join(f"[{n}] {c:.1%}" for n, c in oracle.coverage.items())
        )
    chosen = pick_fastest(
        list(zip(points[1:], strategies, labels)), args.min_agreement, args.criterion, point=lambda c: c[0]
    )
    if chosen is None:
        print(
            f"\nno {'target' if args.per_exit else 'threshold'} keeps {args.criterion} >= {args.min_agreement}: "
            f"raise {'--targets' if args.per_exit else '--thresholds'} or lower --min-agreement"
        )
    else:
        point, strategy, label = chosen
        what = (
            f"exit thresholds {_finite(strategy.exit_thresholds)} ({label})"
            if args.per_exit
            else f"threshold: {strategy.threshold}"
        )
        print(
            f"\nchosen {what} ({args.measure}, {args.kv}): {point.speedup:.2f}x at agreement "
            f"{point.agreement:.3f}, consistency {point.consistency:.3f}, mean exit layer {point.mean_exit_layer:.2f}"
        )
    if args.output_json:
        choice = None
        if chosen is not None:
            choice = {"exit_thresholds": _finite(chosen[1].exit_thresholds)} if args.per_exit else chosen[1].threshold
        with open(args.output_json, "w") as f:
            json.dump(
                {
                    "points": [dict(vars(p), label=label) for p, label in zip(points, ["full depth", *labels])],
                    "measure": args.measure,
                    "kv": args.kv,
                    "chosen": choice,
                    "oracle": None
                    if oracle is None
                    else {
                        "speedup": oracle.speedup,
                        "mean_exit_layer": oracle.mean_exit_layer,
                        "coverage": oracle.coverage,
                    },
                },
                f,
                indent=1,
            )
    sys.exit(0 if chosen else 1)


def guaranteed(model, prompts, args, exits) -> int:
    """Learn-then-Test thresholds, printed and written to --output-json; exit status 0."""
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.inference.learn_then_test import learn_then_test

    if (args.target_consistency is None) == (args.target_agreement is None):
        raise ConfigError("give one of --target-consistency and --target-agreement")
    criterion, target = (
        ("consistency", args.target_consistency)
        if args.target_consistency is not None
        else ("agreement", args.target_agreement)
    )
    for flag, value in ((f"--target-{criterion}", target), ("--confidence", args.confidence)):
        if not 0 < value < 1:
            raise ConfigError(f"{flag} must be in (0, 1), got {value}")
    if len(prompts) < 4:
        raise ConfigError(
            f"--target-{criterion}: Learn-then-Test needs at least 4 prompts (half learn, half test), "
            f"got {len(prompts)}"
        )
    print(
        f"Learn-then-Test: {criterion} >= {target} with probability >= {args.confidence}: {len(prompts) // 2} prompts "
        f"learn the candidate thresholds, {len(prompts) - len(prompts) // 2} test them",
        flush=True,
    )
    result = learn_then_test(
        model,
        prompts,
        args.measure,
        criterion,
        target,
        args.confidence,
        args.max_new_tokens,
        exits,
        args.kv,
        progress=lambda line: print("  " + line, flush=True),
    )
    if result.exit_thresholds:
        print(f"\nguaranteed exit thresholds: { {n: round(t, 4) for n, t in result.exit_thresholds.items()} }")
    else:
        print(
            f"\nno candidate keeps {criterion} >= {target} at confidence {args.confidence} on these prompts: "
            "no exit fires (more prompts tighten the bound)"
        )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result.to_json(), f, indent=1)
        print(f"wrote {args.output_json} (the server reads it with --exit-thresholds-file)")
    return 0


def _finite(pairs):
    """{exit: threshold} of the exits that may fire (an exit no threshold suits is left out)."""
    return {int(n): round(t, 6) for n, t in pairs or () if t <= 1}


def calibrate_per_exit(model, prompts, args, exits):
    """{target: {exit: threshold}}, printed as they are set."""
    import math

    from megatron.early_exit.inference import calibration

    result = {}
    print(f"{'target':>8}  per exit: threshold (agreement of its tokens, share of all tokens)")
    for target, calibrated in calibration.calibrate_per_exit(
        model, prompts, args.measure, sorted(args.targets, reverse=True), args.max_new_tokens, exits
    ).items():
        result[target] = calibration.as_exit_thresholds(calibrated)
        print(
            f"{target:>8}  "
            + "  ".join(
                f"[{c.layer_number}] {c.threshold:.4f} ({c.precision:.3f}, {c.coverage:.3f})"
                if math.isfinite(c.threshold)
                else f"[{c.layer_number}] never"
                for c in calibrated
            ),
            flush=True,
        )
    return result


if __name__ == "__main__":
    main()
