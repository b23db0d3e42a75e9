"""Decoding speed: full depth against early exit (KV recomputation, state propagation)
across thresholds, and self-speculative decoding, on a trained early-exit model.

    python benchmarks/inference_speed.py                        # the shipped model, benchmarks/model
    python benchmarks/inference_speed.py --load runs/quickstart/checkpoints
    python benchmarks/inference_speed.py --train                # trains a model first (CPU, about an hour)

By default the benchmark decodes the model shipped in benchmarks/model (converted once into
WORK_DIR/from_hf), so that every run measures the same weights. With --train, a model is
trained in-process on the Python standard library's sources (corpus, SentencePiece tokenizer
and .bin/.idx are built with the tools in tools/, or reused from a previous run in
--work-dir) and saved there, so a second run only decodes
(or resumes training when --train-iters asks for more iterations than were saved). Then
EE-Tuning with self-distillation (--distill-iters): the exits are replaced by untied
copies of the final norm and output layer (tools/checkpoint/add_exits.py) and trained,
the backbone frozen, towards the final layer's distribution (--exit-distill-weight 1).
Prompts are held out: stdlib modules that the training corpus does not contain; the
per-exit thresholds (--per-exit-targets) are calibrated on other held-out modules.

Each strategy decodes every prompt alone (batch size 1, greedy). Columns: decode
tokens/s; speedup over full depth; agreement (fraction of positions with the full-depth
token); consistency (fraction of tokens the full model would pick after the same prefix);
mean exit layer; ideal speedup (num_layers / mean exit layer: what skipping
layers alone would give); achieved / ideal; accepted drafts (self-speculative).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.benchmark_inputs import (  # noqa: E402
    converted_hf,
    distill_exits,
    held_out_prompts,
    log,
    prepare_corpus,
    train_model,
    trained_iterations,
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default=None, help="checkpoint directory (--save of pretrain_early_exit_gpt.py)")
    p.add_argument(
        "--hf",
        default=None,
        help="a Hugging Face export of the model (benchmarks/train_benchmark_model.py --export), converted "
        "once into WORK_DIR/from_hf",
    )
    p.add_argument(
        "--train", action="store_true", help="train a model in WORK_DIR instead of decoding benchmarks/model"
    )
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "inference_speed"))
    p.add_argument("--train-iters", type=int, default=2000)
    p.add_argument(
        "--distill-iters",
        type=int,
        default=800,
        help="EE-Tuning iterations with self-distillation after pretraining (0: benchmark the pretrained exits)",
    )
    p.add_argument(
        "--per-exit-targets",
        type=float,
        nargs="*",
        default=[0.98, 0.97, 0.96, 0.95],
        help="also decode with thresholds per exit calibrated for these agreements (tools/calibrate_threshold.py "
        "--per-exit), for each --kv",
    )
    p.add_argument(
        "--guarantee",
        default="consistency:0.95:0.9",
        metavar="CRITERION:TARGET:CONFIDENCE",
        help="also decode with Learn-then-Test thresholds (tools/calibrate_threshold.py --target-CRITERION "
        "TARGET --confidence CONFIDENCE) calibrated on --guarantee-prompts other held-out prompts, and "
        "check the bound on the benchmark's prompts ('' to skip)",
    )
    # Risk is tested per prompt: with n test prompts (half of these), a zero-risk candidate has a
    # Hoeffding p-value of exp(-n h1(0, delta)), which stays above 0.1 for n < 46 at delta 0.05.
    # Many short continuations give the test its power.
    p.add_argument("--guarantee-prompts", type=int, default=240)
    # Agreement falls with the continuation's length (it ends at the first differing token): a
    # bound on it holds only for continuations as long as those calibrated, so agreement is
    # calibrated at --max-new-tokens; consistency (per token) on short ones.
    p.add_argument(
        "--guarantee-new-tokens",
        type=int,
        default=None,
        help="continuation length of the guarantee prompts (default: 16 for consistency, --max-new-tokens for "
        "agreement)",
    )
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    # The top-1 minus top-2 probability singles out more of the tokens an exit gets right than
    # the top-1 probability does (docs/early_exit_decoding.md, "Which measure").
    p.add_argument("--measure", default="margin")
    p.add_argument("--kv", nargs="+", default=["recompute", "propagate"])
    # Each active exit costs about a third of a layer per token when it does not fire (its
    # vocabulary projection and softmax): two exits, picked on the shipped model.
    p.add_argument("--exit-layers", type=int, nargs="*", default=[3, 6], help="active exits (given with no value: all)")
    p.add_argument(
        "--speculative",
        nargs="*",
        default=["2:3", "3:3", "3:5:0.3", "3:8:0.4", "4:6:0.3"],
        help="EXIT:NUM_DRAFT[:DRAFT_THRESHOLD] (a row stops drafting after a draft below the threshold)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timings per prompt; the fastest counts")
    p.add_argument("--threads", type=int, default=1, help="torch threads while decoding")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine)",
    )
    p.add_argument(
        "--confidence-estimator",
        default=None,
        help="a tools/train_confidence_estimator.py file; use with --measure learned",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="after the sweep, the fastest early exit at >= 0.95 agreement decodes all prompts in batches "
        "of this size against full depth (0: skip)",
    )
    p.add_argument(
        "--plot", default=None, help="PNG of speed against agreement (default: WORK_DIR/inference_speed.png)"
    )
    return p.parse_args()


# -- the benchmark ------------------------------------------------------------------------


def main():
    args = parse_args()
    import torch

    import megatron.early_exit  # noqa: F401  (platform adapter)

    # isort: split
    from megatron.early_exit.inference import EarlyExit, FullDepth, SelfSpeculative, generate
    from megatron.early_exit.inference.calibration import format_table, oracle_decode, pick_fastest, sweep
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel
    from tools.text_generation_cli import speculative_options

    os.makedirs(args.work_dir, exist_ok=True)
    files = prepare_corpus(args.work_dir)
    ckpt = args.load
    if ckpt is None and args.hf is None and not args.train:
        args.hf = os.path.join(ROOT, "benchmarks", "model")
    if args.hf:
        ckpt = converted_hf(args.hf, args.work_dir)
    if ckpt is None:
        ckpt = os.path.join(args.work_dir, "checkpoints")
        if trained_iterations(ckpt) < args.train_iters:
            train_model(args.work_dir, files, args.train_iters)
        if args.distill_iters:
            ckpt = distill_exits(args.work_dir, files, ckpt, args.distill_iters)
    initialize_parallel(1, 1)
    model, tokenizer, train_args = load_model(ckpt, confidence_estimator=args.confidence_estimator)
    torch.set_num_threads(args.threads)
    extra = args.guarantee_prompts if args.guarantee else 0
    held_out = held_out_prompts(tokenizer, files["jsonl"], 2 * args.num_prompts + extra, args.prompt_tokens)
    prompts, calibration_prompts = held_out[: args.num_prompts], held_out[args.num_prompts : 2 * args.num_prompts]
    guarantee_prompts = held_out[2 * args.num_prompts :]
    exits = tuple(args.exit_layers) if args.exit_layers else None  # --exit-layers with no value: all
    # Full depth's continuations of the calibration prompts, decoded once for the per-exit
    # thresholds and the comparison of measures.
    calibration_continuations = [
        generate(model, [p], FullDepth(), args.max_new_tokens).tokens[0] for p in calibration_prompts
    ]
    strategies = [EarlyExit(t, args.measure, kv, exits) for kv in args.kv for t in args.thresholds]
    labels = [f"{t:g}" for kv in args.kv for t in args.thresholds]
    if args.per_exit_targets:
        per_exit = calibrate(model, calibration_prompts, args, exits, calibration_continuations)
        strategies += [
            EarlyExit(2.0, args.measure, kv, exits, per_exit[t]) for kv in args.kv for t in args.per_exit_targets
        ]
        labels += [f"per exit {t:g}" for kv in args.kv for t in args.per_exit_targets]
    guaranteed = None
    if args.guarantee:
        guaranteed = guarantee(model, guarantee_prompts, args, exits)
        strategies += [EarlyExit(2.0, args.measure, kv, exits, guaranteed.exit_thresholds) for kv in args.kv]
        labels += [f"LTT {guaranteed.criterion} {guaranteed.target:g}" for kv in args.kv]
    strategies += [SelfSpeculative(**speculative_options(s)) for s in args.speculative]
    labels += ["-" for _ in args.speculative]
    log(
        f"model: {train_args.num_layers} layers, hidden {train_args.hidden_size}, exits {train_args.exit_layer_nums}, "
        f"vocab {model.vocab_size}; {len(prompts)} held-out prompts of {args.prompt_tokens} tokens, "
        f"{args.max_new_tokens} new tokens each, measure {args.measure}, {args.threads} thread(s), {args.clock} clock"
    )
    points = sweep(model, prompts, strategies, args.max_new_tokens, args.repeats, clock=args.clock, progress=log)
    for p, label in zip(points[1:], labels):
        if label.startswith("per exit"):
            p.strategy += f" {label[len('per exit ') :]}"
        if label.startswith("LTT"):
            p.strategy += " LTT"
    labelled = list(zip(points[1:], strategies, labels))

    print("\n" + format_table(points))
    print(
        "(per-exit T: thresholds calibrated per exit so that the tokens leaving at each agree with the final layer "
        "at rate T, on other held-out prompts)"
    )
    early = [(p, s, label) for p, s, label in labelled if p.acceptance is None]
    spec = [p for p in points if p.acceptance is not None]
    print("\ngoals:")
    picks = []
    for criterion in ("agreement", "consistency"):
        fastest = pick_fastest(early, 0.95, criterion, point=lambda c: c[0])
        if fastest and fastest not in picks:
            picks.append(fastest)
        if fastest:
            p, _, label = fastest
            print(
                f"  fastest early exit with {criterion} >= 0.95: {p.strategy} threshold {label}: "
                f"{p.speedup:.2f}x (goal >= 1.5x), achieved/ideal {p.efficiency:.2f} (goal >= 0.9)"
            )
        elif criterion == "agreement":
            from benchmarks.confidence_measures import agreement_error_budget

            print(
                f"  no early-exit threshold reached agreement 0.95: over {args.max_new_tokens} new tokens it allows "
                f"{agreement_error_budget(args.max_new_tokens):.2%} of tokens wrong (a continuation differs from its "
                "first wrong token on); benchmarks/confidence_measures.py prints what each exit can let leave at "
                "that precision"
            )
        else:
            print(f"  no early-exit threshold reached {criterion} 0.95")
    for p, _, label in labelled if guaranteed else []:
        if label.startswith("LTT"):
            held = getattr(p, guaranteed.criterion)
            print(
                f"  Learn-then-Test ({guaranteed.criterion} >= {guaranteed.target:g} with probability "
                f"{guaranteed.confidence:g}, calibrated on {guaranteed.num_learn + guaranteed.num_test} other prompts, "
                f"thresholds { {n: round(t, 3) for n, t in guaranteed.exit_thresholds.items()} or 'none valid' }): "
                f"{p.strategy}: {guaranteed.criterion} {held:.3f} on the benchmark's prompts: bound "
                f"{'kept' if held >= guaranteed.target else 'NOT kept'}; {p.speedup:.2f}x"
            )
    if spec:
        top = max(spec, key=lambda p: p.speedup)
        print(
            f"  best self-speculative: {top.strategy}: {top.speedup:.2f}x (goal >= 1.5x), agreement "
            f"{top.agreement:.3f} "
            f"(must be 1.000), accepted {top.acceptance:.2f}"
        )
        need = top.acceptance_for(1.5)
        if need is not None:
            print(
                f"    at its cost per round ({top.drafts_per_round:.2f} drafts and a verification), 1.5x needs "
                f"acceptance {need:.2f}" + (" (more than every draft)" if need > 1 else "")
            )
    if spec:
        fastest = max(labelled, key=lambda c: c[0].speedup if c[0].acceptance is not None else 0)[1]
        ratio, accepted = sampled_speedup(model, prompts, fastest, args.max_new_tokens, args.repeats, args.clock)
        print(
            f"  sampled (temperature 1, top-k 50) {fastest.name}: {ratio:.2f}x over sampling at full depth "
            f"(goal >= 1.3x), accepted {accepted:.2f}; its tokens follow the full model's distribution (rejection "
            "sampling, tests/test_speculative_sampling.py)"
        )
    for kv in args.kv:
        going = [c for c in early if c[1].kv == kv and c[0].mean_exit_layer < c[0].num_layers]
        if going:
            p, _, label = max(going, key=lambda c: c[0].speedup)
            print(
                f"  {kv}: best achieved/ideal {max(c[0].efficiency for c in going):.2f}; fastest at threshold {label}: "
                f"{p.speedup:.2f}x of ideal {p.ideal_speedup:.2f}x"
            )
    propagated = [c[0] for c in early if c[1].kv == "propagate" and c[0].mean_exit_layer < c[0].num_layers]
    if propagated:
        share = kv_projection_share(train_args)
        p = max(propagated, key=lambda p: p.speedup)
        ceiling = propagation_ceiling(p.num_layers, p.mean_exit_layer, share)
        print(
            f"  state propagation at its fastest: every skipped layer still computes its K/V projection "
            f"({share:.0%} of a layer's matmul FLOPs), so its ceiling is {ceiling:.2f}x = "
            f"{ceiling / p.ideal_speedup:.2f} of the ideal {p.ideal_speedup:.2f}x"
        )
    compared = ["max_prob", "margin", "entropy"] + (["learned"] if args.confidence_estimator else [])
    for line in compare_measures(
        model, calibration_prompts, exits, args.max_new_tokens, compared, calibration_continuations
    ):
        print("  " + line)
    oracle = oracle_decode(model, prompts, exits, args.max_new_tokens, args.measure, args.repeats, args.clock)
    print(
        f"  bound of any confidence measure: an exit test that knew the final layer's token (each token leaves at "
        f"the shallowest exit agreeing with it, every exit still tested): {oracle.speedup:.2f}x over full depth, "
        f"tokens equal to full depth: {oracle.equals_full_depth}, mean exit {oracle.mean_exit_layer:.2f}, "
        "exits take " + ", ".join(f"[{n}] {c:.0%}" for n, c in oracle.coverage.items())
    )
    for p, strategy, label in picks if args.batch_size > 1 else []:
        batched = batch_speedup(
            model, prompts, strategy, args.batch_size, args.max_new_tokens, args.repeats, args.clock
        )
        print(
            f"  batch {args.batch_size}: {p.strategy} threshold {label}: {batched:.2f}x over full depth at the "
            f"same batch size = {batched / p.speedup:.0%} of its batch-1 speedup (goal >= 80%)"
        )
    gated = ["gated_max_prob", "learned"] if args.confidence_estimator else []
    for name in dict.fromkeys([args.measure, "max_prob"] + gated):
        if name in gated and not _hidden_only(model):
            continue
        test, layer = exit_test_cost(model, prompts[0], name, min(exits or model.ee_config.exit_layer_nums), 2.0)
        print(
            f"  exit test ({name}) that does not fire: {test * 1e6:.0f} us = {test / layer:.2f} of a layer "
            f"({layer * 1e6:.0f} us) (goal <= 0.15)"
        )
    if _hidden_only(model):
        for n, line in gate_vetoes(model, prompts, exits, args.max_new_tokens, args.thresholds).items():
            print(f"  gate at exit {n}: {line}")
    path = args.plot or os.path.join(args.work_dir, "inference_speed.png")
    plot(points, path)
    print(f"\nplot: {path}")


def guarantee(model, prompts, args, exits):
    from megatron.early_exit.inference.learn_then_test import learn_then_test

    criterion, target, confidence = args.guarantee.split(":")
    new_tokens = args.guarantee_new_tokens or (args.max_new_tokens if criterion == "agreement" else 16)
    log(
        f"Learn-then-Test on {len(prompts)} other held-out prompts of {new_tokens} new tokens: {criterion} >= "
        f"{target} with probability {confidence}"
    )
    result = learn_then_test(
        model,
        prompts,
        args.measure,
        criterion,
        float(target),
        float(confidence),
        new_tokens,
        exits,
        progress=lambda line: log("  " + line),
    )
    log(f"guaranteed thresholds: {result.exit_thresholds or 'none valid: no exit fires'}")
    return result


def calibrate(model, prompts, args, exits, continuations) -> dict:
    """{target: {exit: threshold}} from the full-depth `continuations` of `prompts`."""
    from megatron.early_exit.inference.calibration import as_exit_thresholds, calibrate_per_exit

    out = {}
    for target, calibrated in calibrate_per_exit(
        model, prompts, args.measure, args.per_exit_targets, args.max_new_tokens, exits, continuations
    ).items():
        out[target] = as_exit_thresholds(calibrated)
        log(
            f"per-exit thresholds for {target:g} on {len(prompts)} other held-out prompts: "
            + ", ".join(f"[{c.layer_number}] {c.threshold:.3f} (takes {c.coverage:.0%})" for c in calibrated)
        )
    return out


def compare_measures(model, prompts, exits, max_new_tokens: int, names, continuations, precision=0.95) -> list:
    """Per confidence measure, the share of tokens each exit can let leave while those agree with
    the final layer at `precision` (shallowest exit first), on the full-depth `continuations` of
    `prompts`: how much of the oracle's coverage the measure can see."""
    from megatron.early_exit.inference.calibration import calibrate_per_exit

    lines = []
    for name in names:
        (calibrated,) = calibrate_per_exit(
            model, prompts, name, [precision], max_new_tokens, exits, continuations
        ).values()
        lines.append(
            f"measure {name} at {precision:.0%} precision per exit: tokens leave at "
            + ", ".join(f"[{c.layer_number}] {c.coverage:.0%}" for c in calibrated)
            + f" ({sum(c.coverage for c in calibrated):.0%} in all)"
        )
    return lines


def exit_test_cost(model, prompt, measure_name: str, exit_layer: int, threshold: float, repeats: int = 20) -> tuple:
    """(mean seconds of an exit test that does not fire, seconds of one layer), batch 1, one
    token: the test at `threshold` on the exit's hidden state at each position of `prompt`
    (a real text: a gate sees the states it will see), a layer on the prompt's next token."""

    from megatron.early_exit.inference.confidence import get_confidence_measure
    from megatron.early_exit.inference.context import inference_context
    from megatron.early_exit.inference.decoder import Decoder, confidence_test

    measure = get_confidence_measure(measure_name, model)
    with inference_context(model):
        decoder = Decoder(model, 1, len(prompt) + 1)
        point = decoder.exit_points[exit_layer]
        states = {}

        def observe(depth, x, attention_output):
            if depth in (point.depth - 1, point.depth):
                states[depth] = (x, attention_output)

        decoder.step([0], [list(prompt[:-1])], observe=observe)
        x, attention = states[point.depth]
        previous = states.get(point.depth - 1, (None,))[0]
        tests, seconds = 0, 0.0
        for _ in range(repeats):
            for i in range(x.shape[0]):
                last = x[i : i + 1]
                head_input = attention[i : i + 1] if point.head.has_mlp else None
                start = time.perf_counter()
                fire, _ = confidence_test(
                    model, point, threshold, measure, last, head_input, None if previous is None else previous[i]
                )
                took = time.perf_counter() - start
                if not fire[0]:
                    tests, seconds = tests + 1, seconds + took
        ws = decoder._work_set([0], [len(prompt) - 1], [len(prompt) - 1])
        token = decoder._embed([[prompt[-1]]], ws)
        layer = []
        for _ in range(repeats * 10):
            start = time.perf_counter()
            decoder._run_layer(0, token, ws)
            layer.append(time.perf_counter() - start)
    layer.sort()
    return seconds / max(tests, 1), layer[len(layer) // 2]


def gate_vetoes(model, prompts, exits, max_new_tokens: int, thresholds) -> dict:
    """Per exit, on the full-depth continuations of `prompts`: the share of exit tests the
    hidden-state gate lets through to the vocabulary projection, and for each top-1 threshold
    the share of its fires (max_prob >= threshold) the gate vetoes."""
    import torch

    from megatron.early_exit.inference import FullDepth, generate
    from megatron.early_exit.inference.calibration import exit_confidences
    from megatron.early_exit.inference.confidence import get_confidence_measure
    from megatron.early_exit.inference.learned_confidence import attached

    estimator = attached(model)
    sequences = [list(p) + generate(model, [p], FullDepth(), max_new_tokens).tokens[0] for p in prompts]
    starts = [len(p) - 1 for p in prompts]
    top1 = exit_confidences(model, sequences, get_confidence_measure("max_prob"), exits, starts)
    gate = exit_confidences(
        model, sequences, lambda v: torch.tensor(estimator.gate(v.layer_number, v.hidden)), exits, starts
    )
    out = {}
    for n, (confidence, _) in top1.items():
        passed = gate[n][0].bool()
        vetoes = [
            f"{t:g}: {(~passed & (confidence >= t)).sum() / max(int((confidence >= t).sum()), 1):.0%}"
            for t in thresholds
        ]
        out[n] = f"lets {passed.float().mean():.0%} of tests through; vetoes of max_prob's fires at " + ", ".join(
            vetoes
        )
    return out


def _hidden_only(model) -> bool:
    from megatron.early_exit.inference.learned_confidence import attached

    estimator = attached(model)
    return estimator is not None and not estimator.use_logits


def kv_projection_share(config) -> float:
    """A layer's K/V projection as a share of its matmul FLOPs per token (attention scores aside)."""
    h, heads = config.hidden_size, config.num_attention_heads
    head_dim = config.kv_channels or h // heads
    kv = 2 * h * (config.num_query_groups or heads) * head_dim
    mlp = (3 if config.swiglu else 2) * h * (config.ffn_hidden_size or 4 * h)
    return kv / (h * heads * head_dim + kv + heads * head_dim * h + mlp)


def propagation_ceiling(num_layers: int, mean_exit: float, kv_share: float) -> float:
    """Speedup if each skipped layer costs only its K/V projection."""
    return num_layers / (mean_exit + kv_share * (num_layers - mean_exit))


def sampled_speedup(model, prompts, strategy, max_new_tokens: int, repeats: int, clock: str):
    """(speedup of `strategy` over full depth, both sampling at temperature 1 with top-k 50, acceptance)."""
    from megatron.early_exit.inference import FullDepth, SamplingParams, generate

    seconds, drafted, accepted = {}, 0, 0
    for rep in range(repeats):
        for s in (FullDepth(), strategy):
            results = [
                generate(model, [p], s, max_new_tokens, SamplingParams(1.0, 50, seed=1000 * rep + i))
                for i, p in enumerate(prompts)
            ]
            took = sum(r.decode_seconds if clock == "wall" else r.decode_cpu_seconds for r in results)
            seconds[s.name] = min(seconds.get(s.name, took), took)
            if s is strategy:
                drafted += sum(r.num_drafted for r in results)
                accepted += sum(r.num_accepted for r in results)
    return seconds[FullDepth.name] / seconds[strategy.name], accepted / max(drafted, 1)


def batch_speedup(model, prompts, strategy, batch_size: int, max_new_tokens: int, repeats: int, clock: str) -> float:
    """`strategy` over full depth, all prompts decoded in batches of `batch_size`, best of `repeats`."""
    from megatron.early_exit.inference import FullDepth, generate

    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    seconds = {}
    for _ in range(repeats):
        for s in (FullDepth(), strategy):
            results = [generate(model, b, s, max_new_tokens) for b in batches]
            took = sum(r.decode_seconds if clock == "wall" else r.decode_cpu_seconds for r in results)
            seconds[s.name] = min(seconds.get(s.name, took), took)
    return seconds[FullDepth.name] / seconds[strategy.name]


def plot(points, path: str) -> None:
    """Speedup against agreement: a line per early-exit strategy across thresholds, a point per speculative one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = {}
    for p in points[1:]:
        # One line per strategy across its thresholds (per-exit points carry their target after a space).
        lines.setdefault(p.strategy.split(" ")[0] if p.acceptance is None else "self_speculative", []).append(p)
    for name, group in lines.items():
        group = sorted(group, key=lambda p: p.agreement)
        ax.plot(
            [p.agreement for p in group],
            [p.speedup for p in group],
            "o-" if name != "self_speculative" else "s",
            label=name,
        )
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="full depth")
    ax.axvline(0.95, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("agreement with full depth")
    ax.set_ylabel("decode speedup over full depth")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
