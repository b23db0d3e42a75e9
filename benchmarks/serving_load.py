"""Serving under load: static batching against continuous batching (full depth and early
exit), with open-loop Poisson arrivals through real HTTP.

    python benchmarks/serving_load.py --quick                 # random weights, one short rate (about a minute)
    python benchmarks/serving_load.py                         # trains a small model first (CPU, minutes)
    python benchmarks/serving_load.py --load CKPT --rates 1 2 4 8 --threshold 0.8

Requests are drawn from held-out text (standard-library modules the training corpus left
out): each prompt is a block of source, its output length the length in tokens of the block
that follows it (both clipped). For each rate, requests arrive as a Poisson process (seeded,
the same arrivals for every configuration) and each is sent, when it arrives, as a streamed
POST /v1/completions (greedy), whatever the server's backlog (open loop). Configurations:

    static            a server with --batching static (merges compatible queued requests)
    continuous full   a server with --batching continuous, every token at full depth
    continuous ee     the same server, use_early_exit with --threshold

Per configuration and rate: requests/s and output tokens/s (over the time from the first
request sent to the last answer), time to first token p50/p99, inter-token latency p50/p99
(between consecutive streamed tokens of a request), mean exit layer, and agreement with full
depth (share of positions whose token text equals the full-depth reply's, same prompt),
then the ratios the goals are stated in. A PNG plots latency against throughput.
The machine may be shared with other work: rerun before trusting a difference of a few percent.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.benchmark_inputs import log  # noqa: E402
from benchmarks.server_latency import launch_server  # noqa: E402

QUICK_MODEL_FLAGS = [  # --quick: random weights, NullTokenizer (prompts are token ids as text)
    "--num-layers",
    "4",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "256",
    "--normalization",
    "RMSNorm",
    "--swiglu",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--exit-layer-nums",
    "2",
    "--use-exit-norm",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "512",
    "--make-vocab-size-divisible-by",
    "128",
    "--micro-batch-size",
    "1",
    "--train-iters",
    "1",
    "--lr",
    "1e-3",
    "--mock-data",
    "--seed",
    "3",
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default=None, help="checkpoint to serve (default: train one into --work-dir)")
    p.add_argument(
        "--hf",
        default=None,
        help="serve a Hugging Face export with exits (benchmarks/model): converted once into WORK_DIR/from_hf",
    )
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "serving_load"))
    p.add_argument("--train-iters", type=int, default=400, help="without --load: pretraining iterations")
    p.add_argument("--quick", action="store_true", help="a random-weight model, one rate, few requests: a smoke run")
    p.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="requests per second")
    p.add_argument("--requests", type=int, default=48, help="requests per rate")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--output-tokens", type=int, nargs=2, default=[8, 96], metavar=("MIN", "MAX"))
    p.add_argument("--threshold", type=float, default=0.2, help="early-exit threshold of `continuous ee`")
    p.add_argument(
        "--confidence",
        default="margin",
        help="confidence measure of `continuous ee` (the request's `confidence`; margin: top-1 minus top-2)",
    )
    p.add_argument("--exit-layers", type=int, nargs="*", default=None, help="active exits of `continuous ee`")
    p.add_argument(
        "--kv",
        choices=["recompute", "propagate"],
        default="recompute",
        help="K/V of the tokens that left early (the request's kv_strategy) in `continuous ee`",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--configs", nargs="+", default=["static", "continuous full", "continuous ee"])
    p.add_argument(
        "--plot", default=None, help="PNG of latency against throughput (default: WORK_DIR/serving_load.png)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.rates, args.requests, args.output_tokens, args.prompt_tokens = [4.0], 12, [4, 16], [4, 24]
        args.work_dir = os.path.join(args.work_dir, "quick")
    return args


# -- the model and the requests -------------------------------------------------------------------


def prepare_model(args):
    """(checkpoint, tokenizer, [(prompt text, output tokens)]) for the run."""
    import torch

    import megatron.early_exit  # noqa: F401  (platform adapter)

    # isort: split
    from megatron.early_exit.parallel import initialize_parallel

    os.makedirs(args.work_dir, exist_ok=True)
    initialize_parallel(1, 1)
    rng = random.Random(args.seed)
    if args.quick:
        from megatron.early_exit.checkpoint.writer import save_weights
        from megatron.early_exit.tokenizers import build_tokenizer
        from megatron.early_exit.training.arguments import parse_run_config
        from megatron.early_exit.training.trainer import build_model

        ckpt = os.path.join(args.work_dir, "random")
        if not os.path.exists(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
            train_config = parse_run_config(QUICK_MODEL_FLAGS, world_size=1)
            save_weights(ckpt, train_config.flags, build_model(train_config, torch.device("cpu"), 512), iteration=1)
        tokenizer = build_tokenizer("NullTokenizer", vocab_size=512)
        requests = [
            (
                " ".join(str(rng.randrange(500)) for _ in range(rng.randint(*args.prompt_tokens))),
                rng.randint(*args.output_tokens),
            )
            for _ in range(args.requests)
        ]
        return ckpt, tokenizer, requests
    from benchmarks.benchmark_inputs import prepare_corpus, train_model
    from megatron.early_exit.tokenizers import build_tokenizer

    files = prepare_corpus(args.work_dir)
    tokenizer_model = files["tokenizer"]
    if args.hf:
        from benchmarks.benchmark_inputs import converted_hf

        ckpt = converted_hf(args.hf, args.work_dir)
        tokenizer_model = os.path.join(args.hf, "tokenizer.model")
    else:
        ckpt = args.load or train_model(args.work_dir, files, args.train_iters)
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model)
    return ckpt, tokenizer, held_out_requests(tokenizer, files["jsonl"], args, rng)


def held_out_requests(tokenizer, corpus_jsonl: str, args, rng):
    """(prompt, output length) pairs from consecutive blocks of held-out modules."""
    from benchmarks.benchmark_inputs import held_out_sources

    blocks = []
    for path in held_out_sources(corpus_jsonl):
        text = open(path, encoding="utf-8", errors="replace").read()
        parts = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
        blocks += list(zip(parts, parts[1:]))
    rng.shuffle(blocks)
    out = []
    for prompt, following in blocks:
        ids = tokenizer.tokenize(prompt)
        if len(ids) < args.prompt_tokens[0]:
            continue
        ids = ids[-args.prompt_tokens[1] :]
        length = min(max(len(tokenizer.tokenize(following)), args.output_tokens[0]), args.output_tokens[1])
        out.append((tokenizer.detokenize(ids), length))
        if len(out) == args.requests:
            break
    return out


# -- the server and the load ----------------------------------------------------------------------


def start_server(load: str, batching: str, args, log_path: str):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "run_text_generation_server.py"),
        "--load",
        load,
        "--port",
        "0",
        "--log-level",
        "warning",
        "--max-batch-size",
        str(args.max_batch_size),
        "--threads",
        str(args.threads),
        "--batching",
        batching,
        "--max-queued-requests",
        "4096",
    ]
    return launch_server(cmd, log_path)


def stream_one(client, body: dict, sent_at: float, record: dict) -> None:
    """Send one streamed completion; record when each token's chunk came, its text and exit."""
    times, pieces, exits = [], [], []
    with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            record.update(error=f"{reply.status_code}: {reply.read()[:200]!r}")
            return
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[len("data: ") :])["choices"][0]
            if choice["exit_layers"]:
                times.append(time.perf_counter())
                pieces.append(choice["text"])
                exits += choice["exit_layers"]
    record.update(sent=sent_at, times=times, pieces=pieces, exits=exits, done=time.perf_counter())


def run_load(url: str, requests, rate: float, extra: dict, seed: int) -> list:
    """Open loop: request i is sent at its Poisson arrival time, whatever is still running."""
    import httpx

    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in requests:
        arrivals.append(t)
        t += rng.expovariate(rate)
    records = [dict() for _ in requests]
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    with httpx.Client(base_url=url, timeout=600, limits=limits) as client:
        threads, start = [], time.perf_counter()
        for (prompt, length), at, record in zip(requests, arrivals, records):
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            body = dict(prompt=prompt, max_tokens=length, temperature=0, stream=True, **extra)
            thread = threading.Thread(target=stream_one, args=(client, body, time.perf_counter(), record), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    return records


def percentile(values, q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(records, reference=None) -> dict:
    ok = [r for r in records if "times" in r and r["times"]]
    span = max(r["done"] for r in ok) - min(r["sent"] for r in ok)
    tokens = sum(len(r["times"]) for r in ok)
    ttft = [r["times"][0] - r["sent"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    exits = [d for r in ok for d in r["exits"][1:]]  # the first token is always full depth
    # The most requests in flight at once (sent, not yet answered in full).
    edges = sorted([(r["sent"], 1) for r in ok] + [(r["done"], -1) for r in ok])
    in_flight = peak = 0
    for _, step in edges:
        in_flight += step
        peak = max(peak, in_flight)
    row = dict(
        peak_streams=peak,
        requests_per_s=len(ok) / span,
        tokens_per_s=tokens / span,
        ttft_p50=percentile(ttft, 0.5),
        ttft_p99=percentile(ttft, 0.99),
        itl_p50=percentile(itl, 0.5),
        itl_p99=percentile(itl, 0.99),
        mean_exit=statistics.mean(exits) if exits else float("nan"),
        errors=len(records) - len(ok),
        agreement=float("nan"),
    )
    if reference is not None:
        same = total = 0
        for mine, ref in zip(records, reference):
            if "pieces" in mine and "pieces" in ref:
                total += max(len(mine["pieces"]), len(ref["pieces"]))
                same += sum(a == b for a, b in zip(mine["pieces"], ref["pieces"]))
        row["agreement"] = same / total if total else float("nan")
    return row


COLUMNS = [
    ("peak_streams", "streams", "{}"),
    ("requests_per_s", "req/s", "{:.2f}"),
    ("tokens_per_s", "out tok/s", "{:.1f}"),
    ("ttft_p50", "TTFT p50 s", "{:.3f}"),
    ("ttft_p99", "TTFT p99 s", "{:.3f}"),
    ("itl_p50", "ITL p50 s", "{:.4f}"),
    ("itl_p99", "ITL p99 s", "{:.4f}"),
    ("mean_exit", "mean exit", "{:.2f}"),
    ("agreement", "agreement", "{:.3f}"),
    ("errors", "errors", "{}"),
]


def print_table(results) -> None:
    header = f"{'rate':>6} {'config':<16}" + "".join(f"{title:>12}" for _, title, _ in COLUMNS)
    print(header)
    print("-" * len(header))
    for (rate, config), row in results.items():
        print(f"{rate:>6g} {config:<16}" + "".join(f"{fmt.format(row[key]):>12}" for key, _, fmt in COLUMNS))


def print_goals(results, rates) -> None:
    top = max(rates)
    get = lambda config: results.get((top, config))  # noqa: E731
    static, full, ee = get("static"), get("continuous full"), get("continuous ee")
    streams = max(row["peak_streams"] for (rate, _), row in results.items() if rate == top)
    print(f"\nat the highest rate ({top:g} req/s, up to {streams} concurrent streams):")
    if static and full:
        print(
            f"  continuous full / static output tokens/s: {full['tokens_per_s'] / static['tokens_per_s']:.2f}x "
            f"(goal >= 1.5x); TTFT p99 continuous / static: {full['ttft_p99'] / static['ttft_p99']:.2f} (goal <= 0.33)"
        )
    if full and ee:
        print(
            f"  continuous ee / continuous full output tokens/s: {ee['tokens_per_s'] / full['tokens_per_s']:.2f}x "
            f"(goal >= 1.15x at consistency >= 0.95; agreement here {ee['agreement']:.3f})"
        )


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for config in dict.fromkeys(c for _, c in results):
        rows = [row for (_, c), row in sorted(results.items()) if c == config]
        for ax, key in zip(axes, ("ttft_p50", "itl_p50")):
            ax.plot([r["tokens_per_s"] for r in rows], [r[key] for r in rows], marker="o", label=config)
    for ax, title in zip(axes, ("time to first token p50 (s)", "inter-token latency p50 (s)")):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(title)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("Serving load: latency against throughput (one point per arrival rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = parse_args()
    ckpt, tokenizer, requests = prepare_model(args)
    log(
        f"{len(requests)} requests per rate: prompts {min(len(tokenizer.tokenize(p)) for p, _ in requests)}-"
        f"{max(len(tokenizer.tokenize(p)) for p, _ in requests)} tokens, outputs "
        f"{min(n for _, n in requests)}-{max(n for _, n in requests)} tokens (mean "
        f"{statistics.mean(n for _, n in requests):.1f})"
    )
    ee = dict(use_early_exit=True, early_exit_thres=args.threshold, confidence=args.confidence, kv_strategy=args.kv)
    if args.exit_layers:
        ee["exit_layers"] = args.exit_layers
    extras = {"static": {}, "continuous full": {}, "continuous ee": ee}
    results, records = {}, {}
    for batching in ("static", "continuous"):
        configs = [c for c in args.configs if c.split()[0] == batching]
        if not configs:
            continue
        log_path = os.path.join(tempfile.mkdtemp(prefix="serving_load_"), f"{batching}.log")
        proc, url = start_server(ckpt, batching, args, log_path)
        try:
            run_load(url, requests[:2], 100.0, {}, args.seed)  # warm-up
            for rate in args.rates:
                for config in configs:
                    log(f"--batching {batching}: {config}, {rate:g} requests/s")
                    records[(rate, config)] = run_load(
                        url, requests, rate, extras[config], args.seed + int(rate * 1000)
                    )
        finally:
            proc.terminate()
            proc.wait(30)
    for (rate, config), recs in records.items():
        reference = records.get((rate, "continuous full")) or records.get((rate, "static"))
        results[(rate, config)] = summarize(recs, reference if config.endswith("ee") else None)
    print()
    print_table(results)
    print_goals(results, args.rates)
    path = args.plot or os.path.join(args.work_dir, "serving_load.png")
    plot(results, path)
    log(f"plot: {path}")


if __name__ == "__main__":
    main()
