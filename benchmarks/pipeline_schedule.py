"""Pipeline schedules: simulated bubbles, and measured cost of exits and of bubble filling.

    python benchmarks/pipeline_schedule.py [--iters 6] [--png runs/pipeline_timeline.png]

Part 1 (pure, from plan.py and fill.py): for PP in {2, 4, 8} and several microbatch
counts, the simulated bubble fraction of plain 1F1B, of early-exit 1F1B (exit heads add
to the backward of the stages that own them), of EE-LLM's fixed bubble filling and of
filling into idle slots only (--fill-placement idle), with the time each adds and the
items it trains on, plus a text timeline (and a PNG chart).

Part 1b (pure, pipeline/interleaved.py): the same for the interleaved schedule with v model
chunks per stage, against plain 1F1B, with and without exit heads.

Part 2 (measured, torchrun with 2 processes, PP=2, gloo on CPU): iteration time of
early-exit 1F1B against plain 1F1B with the same backbone, beside the exit heads'
share of FLOPs; and iteration time with each filling against without, beside the
extra exit-training samples it adds and the run-to-run noise of the same schedule.
The script launches torchrun itself.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--png", default=os.path.join(ROOT, "runs", "pipeline_timeline.png"))
    p.add_argument("--skip-measure", action="store_true")
    p.add_argument("--measure-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


# -- part 1: simulation -------------------------------------------------------------


def simulated_table(png: str):
    from megatron.early_exit.pipeline.fill import StageCosts, idle_fill_plan
    from megatron.early_exit.pipeline.plan import (
        build_fill_plan,
        default_num_fill_microbatches,
        pipeline_plan,
        simulate,
    )

    r, exit_share = 2.0, 0.15  # backward/forward ratio; an exit head costs 15% of a stage's F+B

    def exit_costs(p):  # exits on the first half of the stages (EE-LLM's placements)
        return [exit_share * (1 + r) if s < max(1, p // 2) else 0.0 for s in range(p)]

    print("simulated bubble fraction (F=1, B=2 per stage; an exit head on each of the first PP/2 stages costs 0.45)")
    print(
        f"{'PP':>3} {'m':>4} {'1F1B':>7} {'EE 1F1B':>8} {'EE time':>8} {'fixed fill':>11} {'items':>6} {'time':>7}"
        f" {'idle fill':>10} {'items':>6} {'time':>7}"
    )
    for p in (2, 4, 8):
        fills = default_num_fill_microbatches(p, r)
        for m in (4, 8, 16, 32):
            exit_cost = exit_costs(p)
            costs = StageCosts.uniform(p, r, exit_cost)
            f, b = costs.forward, costs.backward
            plain = simulate(pipeline_plan(p, m), f, b)
            early = simulate(pipeline_plan(p, m), f, b, exit_cost)
            fill = build_fill_plan(p, list(range(max(1, p // 2))), fills, fills, r)
            fixed = simulate(pipeline_plan(p, m, fill), f, b, exit_cost)
            idle = idle_fill_plan(p, m, list(range(max(1, p // 2))), costs)
            idle_t = simulate(idle.plan, f, b, exit_cost)
            n_fixed = len(fill.warmup_reach) + len(fill.cooldown_stop)
            n_idle = len(idle.fill.warmup_reach) + len(idle.fill.cooldown_stop)
            print(
                f"{p:>3} {m:>4} {plain.bubble_fraction:>7.3f} {early.bubble_fraction:>8.3f} "
                f"{early.makespan / plain.makespan - 1:>+8.1%}"
                f" {fixed.bubble_fraction:>11.3f} {n_fixed:>6} {fixed.makespan / early.makespan - 1:>+7.1%}"
                f" {idle_t.bubble_fraction:>10.3f} {n_idle:>6} {idle_t.makespan / early.makespan - 1:>+7.1%}"
            )
    p, m = 4, 8
    fill = build_fill_plan(p, [0, 1], 2, 2, r)
    timeline = simulate(pipeline_plan(p, m, fill), [1.0] * p, [r] * p, exit_costs(p))
    print(
        f"\ntimeline, PP={p}, m={m}, EE-LLM's fixed bubble filling (F forward, B backward; w/c warm-up/cool-down fill):"
    )
    print(timeline.render(110))
    idle = idle_fill_plan(p, m, [0, 1], StageCosts.uniform(p, r, exit_costs(p))).plan
    print(f"\ntimeline, PP={p}, m={m}, filling into idle slots only (--fill-placement idle):")
    print(simulate(idle, [1.0] * p, [r] * p, exit_costs(p)).render(110))
    _save_png(timeline, png)


def interleaved_table():
    """Simulated bubble of the interleaved schedule (--num-layers-per-virtual-pipeline-stage)
    against plain 1F1B, with and without exit heads, and the messages each stage sends."""
    from megatron.early_exit.pipeline.interleaved import chunk_costs, interleaved_plan
    from megatron.early_exit.pipeline.plan import pipeline_plan, simulate

    r, head = 2.0, 0.15 * 3.0  # backward/forward ratio; an exit head's cost, as in the table above

    def exit_costs(p, v):  # the heads of part 1 (last layer of each of the first PP/2 stages), on their chunk
        return [head if u % v == v - 1 and u // v < max(1, p // 2) else 0.0 for u in range(p * v)]

    print(
        "\ninterleaved pipeline: simulated bubble fraction (a stage's F=1, B=2 split evenly over its v chunks; "
        "EE: exit heads as above, on the chunk holding their layer)"
    )
    print(
        f"{'PP':>3} {'m':>4} {'v':>3} {'1F1B':>7} {'interleaved':>12} {'EE 1F1B':>8} {'EE interl.':>11} {'EE time':>8}"
        f" {'sends/stage':>12}"
    )
    for p in (2, 4, 8):
        for m in (p, 2 * p, 4 * p):
            plain = simulate(pipeline_plan(p, m), [1.0] * p, [r] * p)
            early = simulate(pipeline_plan(p, m), [1.0] * p, [r] * p, exit_costs(p, 1))
            for v in (2, 4):
                plan = interleaved_plan(p, m, v)
                f, b = chunk_costs([1.0] * p, v), chunk_costs([r] * p, v)
                inter = simulate(plan, f, b)
                inter_early = simulate(plan, f, b, exit_costs(p, v))
                sends = max(sum(a.send for a in actions) for actions in plan)
                print(
                    f"{p:>3} {m:>4} {v:>3} {plain.bubble_fraction:>7.3f} {inter.bubble_fraction:>12.3f}"
                    f" {early.bubble_fraction:>8.3f} {inter_early.bubble_fraction:>11.3f}"
                    f" {inter_early.makespan / early.makespan - 1:>+8.1%} {sends:>12}"
                )
    p, m, v = 4, 8, 2
    print(f"\ntimeline, PP={p}, m={m}, v={v} (interleaved; suffix .c: model chunk c):")
    print(simulate(interleaved_plan(p, m, v), chunk_costs([1.0] * p, v), chunk_costs([r] * p, v)).render(110))


def _save_png(timeline, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG)")
        return
    colors = {"R": ("#4c72b0", "#dd8452"), "W": ("#55a868", "#55a868"), "C": ("#c44e52", "#c44e52")}
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(timeline.spans) + 1))
    for s, spans in enumerate(timeline.spans):
        for start, end, a in spans:
            color = colors[a.item[0]][0 if a.kind == "F" else 1]
            ax.barh(s, end - start, left=start, color=color, edgecolor="white", alpha=1.0 if a.kind == "F" else 0.75)
            ax.text((start + end) / 2, s, str(a)[1:], ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(timeline.spans)), [f"stage {s}" for s in range(len(timeline.spans))])
    ax.invert_yaxis()
    ax.set_xlabel("time (forward = 1)")
    from matplotlib.patches import Patch

    # Bars are labelled by item: R3 the 4th real microbatch, w0 / c0 the first warm-up /
    # cool-down fill item; the colour (and for fill items the shade) tells forward from backward.
    legend = [
        Patch(color=colors["R"][0], label="R3: forward of real microbatch 3"),
        Patch(color=colors["R"][1], alpha=0.75, label="R3: backward of real microbatch 3"),
        Patch(
            color=colors["W"][0],
            label="w0: warm-up fill item 0, forward (lighter: backward); trains the exits it reaches",
        ),
        Patch(
            color=colors["C"][0],
            label="c0: cool-down fill item 0, forward (lighter: backward); its backward stops early",
        ),
    ]
    ax.legend(
        handles=legend,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25 if len(timeline.spans) > 2 else -0.45),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    ax.set_title(f"early-exit 1F1B with bubble filling: bubble {timeline.bubble_fraction:.1%}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"chart: {path}")


# -- part 2: measurement ------------------------------------------------------------


def measure_worker(args):
    import torch
    import torch.nn.functional as F

    import megatron.early_exit  # noqa: F401

    # isort: split
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.flops import backbone_flops, exit_heads_flops
    from megatron.early_exit.loss import early_exit_loss
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
    from megatron.early_exit.parallel import initialize_parallel
    from megatron.early_exit.pipeline.fill import idle_fill_plan, stage_costs
    from megatron.early_exit.pipeline.p2p import StageLinks
    from megatron.early_exit.pipeline.plan import build_fill_plan, pipeline_plan
    from megatron.early_exit.pipeline.schedules import run_schedule

    layers, hidden, vocab, seq, mbs, m = 8, 256, 4096, 256, 2, args.microbatches
    variants = {
        "plain 1F1B": (EarlyExitConfig(), None),
        "EE 1F1B": (EarlyExitConfig(exit_layer_nums=[2, 6], use_exit_norm=True, untie_exit_output_weights=True), None),
        "EE 1F1B + fixed": (
            EarlyExitConfig(exit_layer_nums=[2, 6], use_exit_norm=True, untie_exit_output_weights=True),
            "fixed",
        ),
        "EE 1F1B + idle": (
            EarlyExitConfig(exit_layer_nums=[2, 6], use_exit_norm=True, untie_exit_output_weights=True),
            "idle",
        ),
    }
    initialize_parallel(1, 2, seed=1, device="cpu")  # measured on CPU processes (gloo), as its links are
    times, noise, extra = {}, {}, {}
    rank = torch.distributed.get_rank()
    runs = {}
    for name, (ee, fill_mode) in variants.items():
        config = TransformerConfig(
            num_layers=layers,
            hidden_size=hidden,
            ffn_hidden_size=704,
            num_attention_heads=8,
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            use_cpu_initialization=True,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            masked_softmax_fusion=False,
            gradient_accumulation_fusion=False,
            pipeline_model_parallel_size=2,
            pipeline_dtype=torch.float32,
        )
        model = EarlyExitGPTModel(
            config,
            ee,
            vocab,
            seq,
            pre_process=rank == 0,
            post_process=rank == 1,
            share_embeddings_and_output_weights=False,
        )
        fill = None
        if fill_mode == "fixed":  # r=2 on PP=2 gives 0 items by EE-LLM's formula; use one of each
            fill = build_fill_plan(2, [0, 1], 1, 1, 1.0)
            plan = pipeline_plan(2, m, fill)[rank]
        elif fill_mode == "idle":  # what --fill-placement idle plans for this model
            planned = idle_fill_plan(2, m, [0, 1], stage_costs(config, ee, 2, vocab, seq, 2.0))
            fill, plan = planned.fill, planned.plan[rank]
        else:
            plan = pipeline_plan(2, m)[rank]
        runs[name] = (model, plan, ee)
        if name == "EE 1F1B":
            tokens = mbs * seq
            flop_share = exit_heads_flops(config, ee, tokens, seq, vocab) / backbone_flops(config, tokens, seq, vocab)
        if fill is not None:
            extra[name] = len(fill.warmup_reach) + len(fill.cooldown_stop)
    # The same schedule twice: how far two measurements of one schedule lie apart.
    runs["EE 1F1B again"] = runs["EE 1F1B"]
    links = StageLinks(
        parallel_state.get_pipeline_model_parallel_group(), (seq, mbs, hidden), torch.float32, torch.device("cpu")
    )
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
    batch = (tok[:, :-1], tok[:, 1:], torch.arange(seq).unsqueeze(0).expand(mbs, -1))

    samples = {name: [] for name in runs}
    for i in range(args.iters + 1):
        for name, (model, plan, ee) in runs.items():  # in turns: a slow spell of the machine slows every variant

            def step(data_iterator, model, ee=ee):
                tokens, labels, pos = next(data_iterator)
                return model(tokens, pos, None, labels=labels), lambda o: early_exit_loss(
                    o, torch.ones_like(labels, dtype=torch.float), ee, 0
                )

            model.zero_grad(set_to_none=True)
            torch.distributed.barrier()
            start = time.perf_counter()
            run_schedule(plan, step, {a.item: batch for a in plan}, model, m, links)
            torch.distributed.barrier()
            if i:  # the first round warms up
                samples[name].append(time.perf_counter() - start)
    for name, values in samples.items():
        times[name] = statistics.median(values)
    # Run-to-run noise: the two medians of the same schedule apart, or the spread of its times.
    again = abs(times["EE 1F1B again"] / times["EE 1F1B"] - 1)
    spread = (max(samples["EE 1F1B"]) - min(samples["EE 1F1B"])) / 2 / times["EE 1F1B"]
    noise["EE 1F1B"] = max(again, spread)
    if rank == 0:
        print(
            f"\nmeasured, PP=2 on 2 CPU processes (gloo), {layers} layers, hidden {hidden}, vocab {vocab}, "
            f"{m} microbatches of {mbs}x{seq}, median of {args.iters} iterations:"
        )
        for name, t in times.items():
            print(f"  {name:<16} {t:8.3f} s/iteration")
        print(
            f"  run-to-run noise: the same schedule measured twice {again:+.1%} apart; spread of its iterations "
            f"+-{spread:.1%}"
        )
        ee_ratio = times["EE 1F1B"] / times["plain 1F1B"]
        print(
            f"  exits: time ratio {ee_ratio:.3f} vs exit-head FLOP share {1 + flop_share:.3f} "
            f"(overhead {ee_ratio - 1:+.1%} vs {flop_share:+.1%} of FLOPs)"
        )
        for name in ("EE 1F1B + fixed", "EE 1F1B + idle"):
            fill_ratio = times[name] / times["EE 1F1B"]
            verdict = "within" if abs(fill_ratio - 1) <= noise["EE 1F1B"] else "beyond"
            print(
                f"  {name}: {extra[name]} extra microbatches (+{extra[name] / m:.0%} exit-training samples) "
                f"for {fill_ratio - 1:+.1%} iteration time, {verdict} the run-to-run noise (+-{noise['EE 1F1B']:.1%})"
            )


def main():
    args = parse_args()
    if args.measure_worker:
        return measure_worker(args)
    simulated_table(args.png)
    interleaved_table()
    if args.skip_measure:
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        os.path.abspath(__file__),
        "--measure-worker",
        "--iters",
        str(args.iters),
        "--microbatches",
        str(args.microbatches),
    ]
    print("\nlaunching the measurement (torchrun, 2 processes) ...", flush=True)
    subprocess.run(cmd, check=True, env=env)


if __name__ == "__main__":
    main()
