"""Evaluate an early-exit checkpoint: full depth, each exit alone and early-exit decoding at
each threshold, on lm-evaluation-harness tasks and/or perplexity over a .bin/.idx dataset,
next to decode speed measured in the same run.

    python tools/evaluate.py --load runs/quickstart/checkpoints \\
        --data-path runs/quickstart/stdlib_text_document --exit-layers 2 4 --thresholds 0.9 0.7 0.5 \\
        --tasks my_task --include-path tasks/ --output eval.json --plot eval.png
    torchrun --nproc-per-node 2 tools/evaluate.py --load CKPT --tensor-model-parallel-size 2 ...

Speed (with --exit-layers or --thresholds and --data-path): greedy decoding of
--speed-prompts prompts cut from the dataset, one at a time, for every setting; agreement
is the fraction of positions whose token equals full-depth decoding's. lm-eval tasks need
the `eval` extra (pip install -e .[eval]).
"""

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    from megatron.early_exit.tokenizers import TOKENIZER_TYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--load", required=True, help="checkpoint directory (--save of pretrain_early_exit_gpt.py)")
    g.add_argument("--load-iteration", type=int, default=None, help="default: the latest")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None, help="replace the stored tokenizer")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    g = p.add_argument_group("what to compare")
    g.add_argument(
        "--exit-layers",
        type=int,
        nargs="*",
        default=None,
        help="evaluate each of these exits alone (no values: every exit)",
    )
    g.add_argument(
        "--thresholds",
        type=float,
        nargs="*",
        default=[],
        help="early-exit decoding (top-1 probability confidence) at each threshold",
    )
    g = p.add_argument_group("lm-evaluation-harness")
    g.add_argument("--tasks", nargs="*", default=[], help="task names (comma- or space-separated)")
    g.add_argument("--include-path", default=None, help="folder of local task yaml files")
    g.add_argument("--num-fewshot", type=int, default=None)
    g.add_argument("--log-samples", action="store_true", help="keep every request and its answer in --output")
    g = p.add_argument_group("perplexity and speed")
    g.add_argument("--data-path", default=None, help="prefix of a .bin/.idx dataset (tools/preprocess_data.py)")
    g.add_argument("--seq-length", type=int, default=None, help="tokens per window (default: the model's maximum)")
    g.add_argument("--speed-prompts", type=int, default=8, help="prompts decoded for speed and agreement (0: none)")
    g.add_argument("--prompt-length", type=int, default=32)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--repeats", type=int, default=1, help="timings per prompt; the fastest counts")
    g.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: decoding as a user waits for it; cpu: this process's CPU time, which other jobs on "
        "a shared machine disturb less (use --threads 1)",
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--limit", type=float, default=None, help="documents per task (below 1: a fraction) and windows for perplexity"
    )
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--output", default=None, help="JSON file with every row (and samples with --log-samples)")
    g.add_argument("--plot", default=None, help="PNG file: quality against decode speed")
    return p


def check_args(args) -> None:
    from megatron.early_exit.errors import ConfigError

    args.tasks = [t for item in args.tasks for t in item.split(",") if t]
    if not args.tasks and not args.data_path:
        raise ConfigError("nothing to evaluate: give --tasks and/or --data-path")
    for flag in ("batch_size", "prompt_length", "max_new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit must be > 0, got {args.limit}")
    if args.include_path and not os.path.isdir(args.include_path):
        raise ConfigError(f"--include-path {args.include_path}: not a folder")


def load(args, log):
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import ParallelConfigError, initialize_parallel
    from megatron.early_exit.server.launch import TOKENIZER_FLAGS, build_tokenizer

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ctx = initialize_parallel(tp, pp, device=args.device)
    if ctx.dp_size != 1:
        raise ParallelConfigError(
            f"evaluation runs one model replica: launch --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}) processes, not {ctx.world_size}"
        )
    start = time.perf_counter()
    model, tokenizer, stored = load_model(args.load, tp, ctx.device, args.load_iteration, pp)
    if any(getattr(args, name) is not None for name in TOKENIZER_FLAGS):
        tokenizer = build_tokenizer(args, stored, model.vocab_size)
    log(
        f"loaded {args.load} (TP={tp}, PP={pp}, {stored.num_layers} layers, exits {stored.exit_layer_nums or []}) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return model, tokenizer


def run_perplexity(args, model, tokenizer, settings, rows, log):
    from megatron.early_exit.evaluation import perplexity, read_windows

    seq_length = args.seq_length or model.max_sequence_length
    whole = args.limit is not None and args.limit >= 1
    windows = read_windows(args.data_path, seq_length, int(args.limit) if whole else None)
    if args.limit is not None and not whole:  # a fraction of the dataset's windows
        windows = windows[: max(1, math.ceil(args.limit * len(windows)))]
    log(f"perplexity: {len(windows)} windows of {seq_length} tokens from {args.data_path}")
    results = perplexity(model, windows, settings, args.batch_size, tokenizer.vocab_size, progress=log)
    for setting, row, result in zip(settings, rows, results):
        row.perplexity, row.mean_depth = result.perplexity, result.mean_depth
        log(
            f"  {setting.name}: perplexity {result.perplexity:.3f} over {result.num_tokens} tokens, "
            f"mean depth {result.mean_depth:.2f}"
        )
    return windows


def run_speed(args, model, windows, settings, rows, log):
    """Greedy decoding of prompts cut from the dataset under every setting, one at a time."""
    from megatron.early_exit.inference.calibration import time_strategies, token_agreement

    prompts = [w[: args.prompt_length] for w in windows[: args.speed_prompts]]
    max_new = min(args.max_new_tokens, model.max_sequence_length - args.prompt_length)
    log(f"speed: {len(prompts)} prompts of {args.prompt_length} tokens, {max_new} new tokens each")
    runs = time_strategies(
        model,
        prompts,
        [s.strategy() for s in settings],
        max_new,
        args.repeats,
        stop_tokens=(),
        clock=args.clock,
        progress=lambda line: log("  " + line),
        names=[s.name for s in settings],
    )
    reference = [r.tokens[0] for r in runs[0]]
    full_tps = None
    for row, results in zip(rows, runs):
        seconds = sum(r.decode_seconds if args.clock == "wall" else r.decode_cpu_seconds for r in results)
        row.tokens_per_second = sum(r.num_decoded for r in results) / seconds if seconds else None
        full_tps = full_tps or row.tokens_per_second
        row.speedup = row.tokens_per_second / full_tps if row.tokens_per_second and full_tps else None
        row.agreement = token_agreement(reference, [r.tokens[0] for r in results])
        if row.mean_depth is None:
            depths = [d for r in results for d in r.exit_layers[0][1:]]
            row.mean_depth = sum(depths) / len(depths) if depths else None


def run_tasks(args, model, tokenizer, settings, rows, log):
    from megatron.early_exit.errors import ConfigError

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from megatron.early_exit.evaluation.lm_eval_model import EarlyExitLM
    except ImportError as err:
        raise ConfigError(f"--tasks needs lm-evaluation-harness: pip install -e .[eval] ({err})") from err
    manager = task_manager(TaskManager, args.include_path, args.tasks)
    unknown = [t for t in args.tasks if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(
            f"--tasks {' '.join(unknown)}: no such lm-eval task"
            + (
                f" (nor in --include-path {args.include_path})"
                if args.include_path
                else " (local task files: --include-path)"
            )
        )
    limit = None if args.limit is None else (args.limit if args.limit < 1 else int(args.limit))
    samples = {}
    full_gen_tps = None
    for setting, row in zip(settings, rows):
        lm = EarlyExitLM(model, tokenizer, setting, args.batch_size, progress=log)
        log(f"lm-eval {', '.join(args.tasks)}: {setting.name}")
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=args.tasks,
            num_fewshot=args.num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=args.log_samples,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
        if out is None:  # lm-eval answers on the first process only (LOCAL_RANK 0)
            continue
        row.metrics.update(task_metrics(out["results"]))
        if args.log_samples:
            samples[setting.name] = out["samples"]
        tps = lm.stats.tokens_per_second
        if row.tokens_per_second is None and tps:  # no dataset decoding: the generation tasks' own speed
            full_gen_tps = full_gen_tps or tps
            row.tokens_per_second, row.speedup = tps, tps / full_gen_tps
            row.mean_depth = row.mean_depth if row.mean_depth is not None else lm.stats.mean_depth
        log("  " + ", ".join(f"{k} {v:.4f}" for k, v in row.metrics.items()))
    return samples


def task_manager(cls, include_path, tasks):
    """lm-eval's task index: the local folder alone when it holds every task asked for
    (indexing lm-eval's thousands of built-in tasks takes a while), else both."""
    if include_path:
        local = cls(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    return cls(include_path=include_path)


def task_metrics(results: dict) -> dict:
    """{"task metric": value} for each numeric metric of each task (standard errors left out)."""
    metrics = {}
    for task, values in results.items():
        for key, value in values.items():
            name = key.split(",")[0]
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and not name.endswith("_stderr")
                and name != "sample_len"
            ):
                metrics[f"{task} {name}"] = float(value)
    return metrics


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch

    from megatron.early_exit.errors import install_excepthook

    install_excepthook()
    check_args(args)
    from megatron.early_exit.evaluation import Row, build_settings, format_table, plot, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    rank0 = lambda: not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0  # noqa: E731

    def log(line: str) -> None:
        if rank0():
            print(line, flush=True)

    model, tokenizer = load(args, log)
    exits = list(model.ee_config.exit_layer_nums) if args.exit_layers == [] else args.exit_layers
    settings = build_settings(model, exits, args.thresholds, pipeline=args.pipeline_model_parallel_size > 1)
    rows = [Row(s.name, s.exit_layer, s.threshold) for s in settings]
    samples = {}
    if args.data_path:
        windows = run_perplexity(args, model, tokenizer, settings, rows, log)
        if len(settings) > 1 and args.speed_prompts > 0:
            run_speed(args, model, windows, settings, rows, log)
    if args.tasks:
        samples = run_tasks(args, model, tokenizer, settings, rows, log)
    log("\n" + format_table(rows))
    if rank0():
        if args.output:
            write_json(args.output, rows, **({"samples": samples} if args.log_samples else {}))
            log(f"wrote {args.output}")
        if args.plot:
            plot(args.plot, rows)
            log(f"wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
