"""Pipeline-based early exit (EE-LLM) over two pipeline stages: decode speed against
full-depth decoding over the same two stages, across thresholds.

    python benchmarks/pipeline_inference.py [--load CKPT]      # starts 2 processes itself

Uses the model benchmarks/inference_speed.py trains (its --work-dir), or --load. Each
prompt is decoded alone (greedy), every strategy timed --repeats times (fastest kept).
Columns: decode tokens/s, speedup over full depth at PP=2, mean exit layer, agreement
with the full-depth tokens. A one-process full-depth run (PP=1) gives the baseline of
what splitting the model costs on this machine. On a 2-core CPU the two stages compete
for cores with nothing else; the overlap EE-LLM gains from is stage 1 starting the next
token while stage 2 completes the exited one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default=None)
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "inference_speed"))
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.8, 0.6, 0.4])
    p.add_argument("--exit-layers", type=int, nargs="*", default=[2, 4])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a host with a GPU for each of the 2 processes")
    return p.parse_args()


def log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(model, prompts, strategy, max_new_tokens, repeats):
    from megatron.early_exit.inference import generate

    seconds, tokens, depths = 0.0, [], []
    for prompt in prompts:
        runs = [generate(model, [prompt], strategy, max_new_tokens=max_new_tokens) for _ in range(repeats)]
        seconds += min(run.decode_seconds for run in runs)  # the fastest repeat counts
        tokens.append(runs[0].tokens[0])
        depths += runs[0].exit_layers[0][1:]
    decoded = sum(len(t) - 1 for t in tokens)
    return decoded / seconds, tokens, sum(depths) / max(len(depths), 1)


def agreement(tokens, reference) -> float:
    same = total = 0
    for row, ref in zip(tokens, reference):
        same += sum(a == b for a, b in zip(row, ref))
        total += len(ref)
    return same / total


def run_ranks(args):
    import torch

    import megatron.early_exit  # noqa: F401

    # isort: split
    from benchmarks.benchmark_inputs import held_out_prompts, prepare_corpus
    from megatron.early_exit.inference import EarlyExit, FullDepth
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    torch.set_num_threads(1)
    files = prepare_corpus(args.work_dir) if int(os.environ["RANK"]) == 0 else None
    holder = [files]
    initialize_parallel(1, 1, device=args.device)
    torch.distributed.broadcast_object_list(holder)
    files = holder[0]
    ckpt = args.load or os.path.join(args.work_dir, "checkpoints")
    rows = []

    # One process, whole model: the baseline (rank 0 decodes, rank 1 waits).
    model, tokenizer, train_args = load_model(ckpt)
    prompts = held_out_prompts(tokenizer, files["jsonl"], args.num_prompts, args.prompt_tokens)
    if torch.distributed.get_rank() == 0:
        tps, _, _ = timed(model, prompts, FullDepth(), args.max_new_tokens, args.repeats)
        rows.append(("full depth, PP=1 (1 process)", tps, None, float(train_args.num_layers), None))
        log(f"PP=1 full depth: {tps:.1f} tokens/s")
    torch.distributed.barrier()

    initialize_parallel(1, 2, device=args.device)
    model, _, _ = load_model(ckpt, pipeline_model_parallel_size=2)
    full_tps, reference, _ = timed(model, prompts, FullDepth(), args.max_new_tokens, args.repeats)
    rows.append(("full depth, PP=2", full_tps, 1.0, float(train_args.num_layers), 1.0))
    log(f"PP=2 full depth: {full_tps:.1f} tokens/s")
    exits = tuple(args.exit_layers) if args.exit_layers else None
    for threshold in args.thresholds:
        tps, tokens, mean_exit = timed(
            model, prompts, EarlyExit(threshold, kv="pipeline", exit_layers=exits), args.max_new_tokens, args.repeats
        )
        rows.append((f"pipeline EE @{threshold}, PP=2", tps, tps / full_tps, mean_exit, agreement(tokens, reference)))
        log(f"threshold {threshold}: {tps:.1f} tokens/s")
    if torch.distributed.get_rank() == 0:
        print(
            f"\nmodel: {train_args.num_layers} layers, exits {train_args.exit_layer_nums} (active "
            f"{list(exits or [])}); "
            f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, greedy, 1 thread per process"
        )
        print(f"{'strategy':34s} {'tok/s':>8s} {'speedup':>8s} {'mean exit':>10s} {'agreement':>10s}")
        for name, tps, speedup, mean_exit, agree in rows:
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            print(f"{name:34s} {tps:8.1f} {fmt(speedup, '8.2f'):>8s} {mean_exit:10.2f} {fmt(agree, '10.3f'):>10s}")


def main():
    args = parse_args()
    if "WORLD_SIZE" in os.environ:
        return run_ranks(args)
    ckpt = args.load or os.path.join(args.work_dir, "checkpoints")
    if not os.path.isfile(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
        sys.exit(f"error: no checkpoint at {ckpt}: run benchmarks/inference_speed.py first, or give --load")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        os.path.abspath(__file__),
    ]
    sys.exit(subprocess.call(cmd + sys.argv[1:], env=env))


if __name__ == "__main__":
    main()
