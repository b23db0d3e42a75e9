"""Text generation server: reply latency of a short request, and tokens/s under load.

    python benchmarks/server_latency.py                      # a random-weight model (seconds to build)
    python benchmarks/server_latency.py --load runs/quickstart/checkpoints --tensor-model-parallel-size 2

Starts tools/run_text_generation_server.py (torchrun for TP > 1) on a free loopback port and
measures, with HTTP clients in this process:
  latency     one client, a short request (--short-tokens new tokens) again and again: the
              median reply time of PUT /api and POST /v1/completions, next to the same
              generate() call made directly in this process (the HTTP + queue overhead)
  throughput  C clients, each sending --requests-per-client requests of --new-tokens tokens:
              generated tokens per second over the whole run, for greedy requests (which the
              server batches when they queue together) and seeded sampled ones (never batched)

Without --load the model has random weights (8 layers, hidden 192, vocabulary 2048, exits
after layers 2 and 4): speed does not depend on what the weights learnt, but early exit at a
useful threshold would not fire, so the early-exit row uses threshold 0 (every token leaves
at the first exit: what skipping layers can give at most).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.benchmark_inputs import log, write_random_checkpoint  # noqa: E402

RANDOM_MODEL_FLAGS = [
    "--num-layers",
    "8",
    "--hidden-size",
    "192",
    "--ffn-hidden-size",
    "512",
    "--num-attention-heads",
    "6",
    "--seq-length",
    "256",
    "--normalization",
    "RMSNorm",
    "--swiglu",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--exit-layer-nums",
    "2",
    "4",
    "--use-exit-norm",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "2048",
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
    p.add_argument("--load", default=None, help="checkpoint to serve (default: a random-weight model)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--short-tokens", type=int, default=8, help="new tokens of the latency request")
    p.add_argument("--latency-repeats", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens of each load request")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests-per-client", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server process (and the direct call)")
    return p.parse_args()


def start_server(load: str, tp: int, log_path: str, threads: int):
    flags = [
        os.path.join(ROOT, "tools", "run_text_generation_server.py"),
        "--load",
        load,
        "--port",
        "0",
        "--log-level",
        "warning",
        "--max-batch-size",
        "16",
        "--threads",
        str(threads),
    ]
    if tp > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={tp}",
            *flags,
            "--tensor-model-parallel-size",
            str(tp),
        ]
    else:
        cmd = [sys.executable, *flags]
    return launch_server(cmd, log_path)


def launch_server(cmd, log_path: str):
    """Start a server command in its own session; (process, base URL) once it says where it serves."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        env=dict(env, PYTHONWARNINGS="ignore"),
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while True:
        found = re.search(r"serving \S+ on (http://\S+)", open(log_path).read())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{open(log_path).read()[-3000:]}")
        time.sleep(0.2)


def prompt_text(i: int, n: int, vocab: int) -> str:
    return " ".join(str((i * 131 + j * 17) % (vocab - 1)) for j in range(n))


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_latency(client, engine, args, vocab) -> list:
    from megatron.early_exit.inference import FullDepth, generate

    prompt = prompt_text(0, args.prompt_tokens, vocab)
    api = dict(prompts=[prompt], tokens_to_generate=args.short_tokens, top_k=1)
    openai = dict(prompt=prompt, max_tokens=args.short_tokens, temperature=0)

    def put():
        assert client.put("/api", json=api).status_code == 200

    def post():
        assert client.post("/v1/completions", json=openai).status_code == 200

    rows = []
    if engine is not None:
        ids = [int(t) for t in prompt.split()]
        rows.append(
            (
                "generate() in this process",
                median_seconds(lambda: generate(engine, [ids], FullDepth(), args.short_tokens), args.latency_repeats),
            )
        )
        log(f"  direct generate(): {rows[-1][1] * 1000:.1f} ms")
    for name, call in (("PUT /api", put), ("POST /v1/completions", post)):
        rows.append((name, median_seconds(call, args.latency_repeats)))
        log(f"  {name}: {rows[-1][1] * 1000:.1f} ms")
    return rows


def measure_load(client, url, args, clients: int, kind: str, vocab: int) -> tuple:
    """(tokens/s, seconds, engine calls) with `clients` clients sending requests at once."""
    import httpx

    def body(i):
        prompt = prompt_text(i, args.prompt_tokens, vocab)
        common = dict(prompts=[prompt], tokens_to_generate=args.new_tokens)
        if kind == "greedy":
            return dict(common, top_k=1)
        if kind == "early exit (threshold 0)":
            return dict(common, top_k=1, use_early_exit=True, early_exit_thres=0.0)
        return dict(common, temperature=1.0, random_seed=i)

    counts = []
    lock = threading.Lock()

    def run_client(c):
        with httpx.Client(base_url=url, timeout=600) as mine:
            for r in range(args.requests_per_client):
                reply = mine.put("/api", json=body(c * 1000 + r))
                assert reply.status_code == 200, reply.text
                with lock:
                    counts.append(sum(len(t) for t in reply.json()["exit_layers"]))

    served = client.get("/health").json()["served"]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run_client, range(clients)))
    seconds = time.perf_counter() - start
    calls = client.get("/health").json()["served"] - served
    return sum(counts) / seconds, seconds, calls


def main():
    args = parse_args()
    import httpx
    import torch

    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    torch.set_num_threads(args.threads)  # as many as each server process, for the direct call
    initialize_parallel(1, 1)
    work = tempfile.mkdtemp(prefix="server_latency_")
    load = args.load
    if load is None:
        load = os.path.join(work, "ckpt")
        log("writing a random-weight checkpoint")
        write_random_checkpoint(load, RANDOM_MODEL_FLAGS, 2048)
    log(f"starting the server (TP={args.tensor_model_parallel_size}); load average {os.getloadavg()[0]:.2f}")
    proc, url = start_server(load, args.tensor_model_parallel_size, os.path.join(work, "server.log"), args.threads)
    try:
        engine, tokenizer, _ = load_model(load) if args.tensor_model_parallel_size == 1 else (None, None, None)
        if tokenizer is None:
            from megatron.early_exit.inference.loading import checkpoint_path
            from megatron.early_exit.training.arguments import stored_args

            stored = stored_args(checkpoint_path(load))
            vocab = stored.vocab_size or 2048
        else:
            vocab = tokenizer.vocab_size
        log(f"serving at {url}; {args.threads} torch thread(s) per server process")
        with httpx.Client(base_url=url, timeout=600) as client:
            log(
                f"latency: a {args.prompt_tokens}-token prompt, {args.short_tokens} new tokens, greedy, "
                f"median of {args.latency_repeats}"
            )
            latency = measure_latency(client, engine, args, vocab)
            load_rows = []
            for kind in ("greedy", "early exit (threshold 0)", "sampled (seeded)"):
                for clients in args.clients:
                    log(
                        f"load: {clients} client(s) x {args.requests_per_client} requests of {args.new_tokens} "
                        f"tokens, {kind}"
                    )
                    tps, seconds, calls = measure_load(client, url, args, clients, kind, vocab)
                    load_rows.append((kind, clients, tps, seconds, calls))
                    log(
                        f"  {tps:.1f} tokens/s ({seconds:.1f} s, {clients * args.requests_per_client} requests in "
                        f"{calls} engine calls)"
                    )
    finally:
        proc.terminate()
        proc.wait(30)

    print(f"\nload average of the machine at the end: {os.getloadavg()[0]:.2f} (other jobs slow every row alike)")
    print(f"\nreply latency ({args.prompt_tokens}-token prompt, {args.short_tokens} new tokens, greedy, one client)")
    for name, seconds in latency:
        print(f"  {name:<30}{seconds * 1000:>9.1f} ms")
    print(f"\nthroughput ({args.requests_per_client} requests per client, {args.new_tokens} new tokens each)")
    print(f"  {'requests':<26}{'clients':>8}{'tokens/s':>10}{'seconds':>9}{'engine calls':>14}{'vs 1 client':>13}")
    base = {}
    for kind, clients, tps, seconds, calls in load_rows:
        base.setdefault(kind, tps)
        print(f"  {kind:<26}{clients:>8}{tps:>10.1f}{seconds:>9.1f}{calls:>14}{tps / base[kind]:>12.2f}x")


if __name__ == "__main__":
    main()
