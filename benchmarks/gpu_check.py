"""One command that measures a GPU: each step a subprocess under its own time limit (a step
that fails or runs out of time is recorded and the next one runs), into one JSON summary.

    python benchmarks/gpu_check.py                 # make bench-gpu; on CPU a dry run (small shapes)
    python benchmarks/gpu_check.py --dry-run       # the same small shapes on CPU, also on a GPU host

Steps (seconds allowed, on one H100 about 9 minutes in all):
  setup      make setup-gpu: Transformer Engine and flash-attn (a dry run reports what is installed)
  test_gpu   make test-gpu: the GPU-marked tests, counted (passed / skipped / failed)
  train      bf16 training tokens/s of a ~125M GPT without exits, then with two exits (the ratio is
             early exit's training overhead); the second run saves the checkpoint decoded next
  vs_hf      decode tokens/s against transformers' generate on the same (random) weights, batch 1 and 8
  decode     full depth, early exit and self-speculative decoding of the trained checkpoint at batch 1
             and 8: tokens/s, ratios to full depth, mean exit layer, acceptance, host syncs per step
The summary: runs/gpu_check/summary.json (--out), one entry per step: ok, seconds, limit, the
numbers it measured, and the tail of its output when it failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LIMITS = {"setup": 240, "test_gpu": 120, "train": 80, "vs_hf": 50, "decode": 40}  # seconds, H100
# ~125M parameters: 12 layers, hidden 768, 12 heads, GPT-2's 50k vocabulary.
GPU_SHAPE = dict(
    layers=12, hidden=768, heads=12, ffn=2048, vocab=50257, seq=1024, micro_batch=8, iters=30, log_interval=5
)
DRY_SHAPE = dict(layers=3, hidden=64, heads=4, ffn=128, vocab=512, seq=64, micro_batch=2, iters=6, log_interval=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="small shapes on CPU (the default without CUDA)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check", "summary.json"))
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "gpu_check"))
    p.add_argument("--limit", action="append", default=[], metavar="STEP=SECONDS", help="change a step's time limit")
    p.add_argument("--decode", default=None, help=argparse.SUPPRESS)  # the decode step itself: a checkpoint
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_step(name, cmd, limit, env, parse):
    """Run one step; never raises. Returns its summary entry."""
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        out, ok = proc.stdout + proc.stderr, proc.returncode == 0
        entry = {"ok": ok, "returncode": proc.returncode}
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        entry = {"ok": False, "returncode": None, "timed_out": True}
    entry.update(seconds=round(time.time() - start, 1), limit_s=limit)
    try:
        entry["result"] = parse(out)
    except Exception as err:  # a step that printed nothing parsable is a failed step, not a crash
        entry["ok"], entry["parse_error"] = False, f"{type(err).__name__}: {err}"
    if not entry["ok"]:
        entry["output_tail"] = out[-2000:]
    print(
        f"  {name:9s} {'ok' if entry['ok'] else 'FAILED':6s} {entry['seconds']:7.1f} s (limit {limit} s)"
        f"  {json.dumps(entry.get('result'))[:160]}",
        flush=True,
    )
    return entry


def train_flags(shape, device, dry, exits, save=None):
    flags = [
        "--num-layers",
        shape["layers"],
        "--hidden-size",
        shape["hidden"],
        "--num-attention-heads",
        shape["heads"],
        "--ffn-hidden-size",
        shape["ffn"],
        "--seq-length",
        shape["seq"],
        "--max-position-embeddings",
        shape["seq"],
        "--micro-batch-size",
        shape["micro_batch"],
        "--global-batch-size",
        shape["micro_batch"],
        "--train-iters",
        shape["iters"],
        "--lr",
        "1e-4",
        "--lr-warmup-iters",
        1,
        "--mock-data",
        "--vocab-size",
        shape["vocab"],
        "--normalization",
        "RMSNorm",
        "--swiglu",
        "--disable-bias-linear",
        "--position-embedding-type",
        "rope",
        "--untie-embeddings-and-output-weights",
        "--hidden-dropout",
        0,
        "--attention-dropout",
        0,
        "--eval-iters",
        0,
        "--log-interval",
        shape["log_interval"],
        "--device",
        device,
        "--seed",
        1,
    ]
    if not dry:
        flags += ["--bf16"]
    if exits:
        third = shape["layers"] // 3
        flags += ["--exit-layer-nums", third, 2 * third, "--exit-layer-weight", 0.3, 0.3, "--use-exit-norm"]
    if save:
        flags += ["--save", save]
    return [str(f) for f in flags]


def tokens_per_second(out):
    """Median of the logged iterations' tokens/s, the first interval (warm-up, compile) left out."""
    values = [float(v) for v in re.findall(r"tokens/s: ([0-9.]+)", out)]
    if len(values) < 2:
        raise ValueError(f"{len(values)} logged intervals")
    return round(statistics.median(values[1:]), 1)


def parse_pytest(out):
    counts = {
        k: int(n)
        for n, k in re.findall(
            r"(\d+) (passed|skipped|failed|errors?|deselected)", out.splitlines()[-1] if out.strip() else ""
        )
    }
    if not counts:
        raise ValueError("no pytest summary line")
    return counts


def parse_vs_hf(out):
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)x\s+(\w+)", line)
        if m:
            rows.append(
                {
                    "threads": int(m[1]),
                    "batch": int(m[2]),
                    "transformers_tok_s": float(m[3]),
                    "ours_tok_s": float(m[4]),
                    "ratio": float(m[5]),
                    "tokens_equal": m[6] == "True",
                }
            )
    if not rows:
        raise ValueError("no result rows")
    return rows


def last_json(out):
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def main(argv=None):
    args = parse_args(argv)
    if args.decode:
        return decode(args.decode, args.device)
    import torch

    dry = args.dry_run or not torch.cuda.is_available()
    device = "cpu" if dry else "cuda"
    limits = dict(LIMITS)
    for item in args.limit:
        step, _, seconds = item.partition("=")
        if step not in limits or not seconds.isdigit():
            sys.exit(f"error: --limit {item}: expected STEP=SECONDS with STEP one of {', '.join(limits)}")
        limits[step] = int(seconds)
    if dry:  # small shapes on a shared CPU: room for a busy machine
        limits = {k: max(v, 300) for k, v in limits.items()}
    shape = DRY_SHAPE if dry else GPU_SHAPE
    os.makedirs(args.work_dir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
    py, ckpt = sys.executable, os.path.join(args.work_dir, "ee_checkpoint")
    print(f"GPU check on {'CPU (dry run, small shapes)' if dry else torch.cuda.get_device_name()}:", flush=True)
    summary = {"device": "cpu" if dry else torch.cuda.get_device_name(), "dry_run": dry, "steps": {}}
    steps = summary["steps"]

    steps["setup"] = run_step(
        "setup",
        ["bash", "tools/setup_gpu.sh", "--check", py] if dry else ["make", "setup-gpu"],
        limits["setup"],
        env,
        last_json if dry else (lambda out: None),
    )
    # A dry run: one GPU test that runs on CPU with EE_GPU_TESTS_ON_CPU (the others skip there).
    gpu_tests = ["tests/test_gpu_end_to_end.py", "-k", "distributed_optimizer_without_gloo"] if dry else ["tests"]
    steps["test_gpu"] = run_step(
        "test_gpu",
        [py, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider", *gpu_tests],
        limits["test_gpu"],
        dict(env, EE_GPU_TESTS_ON_CPU="1") if dry else env,
        parse_pytest,
    )
    import shutil

    for previous in (ckpt, os.path.join(args.work_dir, "vs_hf")):  # the steps write into new directories
        shutil.rmtree(previous, ignore_errors=True)
    train = {}
    for exits in (False, True):
        name = "with exits" if exits else "without exits"
        cmd = [py, "pretrain_early_exit_gpt.py", *train_flags(shape, device, dry, exits, ckpt if exits else None)]
        train[name] = run_step(f"train {'EE' if exits else 'plain'}", cmd, limits["train"], env, tokens_per_second)
    ok = all(e["ok"] for e in train.values())
    steps["train"] = {
        "ok": ok,
        "tokens_per_s": {k: e.get("result") for k, e in train.items()},
        "runs": train,
        "shape": {**shape, "dtype": "fp32" if dry else "bf16"},
    }
    if ok:
        steps["train"]["ee_time_ratio"] = round(train["without exits"]["result"] / train["with exits"]["result"], 3)
    hf_shape = (
        [
            "--layers",
            2,
            "--hidden",
            64,
            "--vocab",
            512,
            "--prompt-tokens",
            8,
            "--new-tokens",
            8,
            "--repeats",
            1,
            "--threads",
            1,
        ]
        if dry
        else [
            "--layers",
            12,
            "--hidden",
            768,
            "--vocab",
            32000,
            "--prompt-tokens",
            64,
            "--new-tokens",
            128,
            "--repeats",
            2,
        ]
    )
    steps["vs_hf"] = run_step(
        "vs_hf",
        [
            py,
            "benchmarks/vs_transformers.py",
            "--device",
            device,
            "--batch-sizes",
            "1",
            "8",
            "--work-dir",
            os.path.join(args.work_dir, "vs_hf"),
            *map(str, hf_shape),
        ],
        limits["vs_hf"],
        env,
        parse_vs_hf,
    )
    steps["decode"] = run_step(
        "decode",
        [py, os.path.abspath(__file__), "--decode", ckpt, "--device", device],
        limits["decode"],
        env,
        last_json,
    )
    summary["ok"] = all(s["ok"] for s in steps.values())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"summary: {args.out} ({'every step ok' if summary['ok'] else 'some steps failed'})")
    return 0 if summary["ok"] else 1


def decode(ckpt, device):
    """The decode step (in its own process): strategies on the checkpoint the training step saved."""
    import torch

    from megatron.early_exit.inference import EarlyExit, FullDepth, SelfSpeculative, generate
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    initialize_parallel(1, 1, device=device)
    model, _, config = load_model(ckpt)
    exits = config.early_exit.exit_layer_nums
    g = torch.Generator().manual_seed(0)
    new = 32 if device == "cuda" else 8
    # Mock-data weights are barely trained: the threshold is the median confidence of the first
    # exit, so that about half the tokens leave early (the mechanics are measured, not quality).
    probe = generate(
        model,
        torch.randint(0, config.padded_vocab_size, (4, 16), generator=g).tolist(),
        EarlyExit(threshold=0.0, exit_layers=(exits[0],)),
        new,
    )
    threshold = statistics.median(math.exp(lp) for row in probe.logprobs for lp in row[1:])
    strategies = {
        "full depth": FullDepth(),
        f"early exit {threshold:.3f}": EarlyExit(threshold=threshold),
        f"self-speculative (exit {exits[0]}, 4 drafts)": SelfSpeculative(exit_layer=exits[0], num_draft=4),
    }
    rows = []
    for batch in (1, 8):
        prompts = torch.randint(
            0, config.padded_vocab_size, (batch, 64 if device == "cuda" else 8), generator=g
        ).tolist()
        full = None
        for name, strategy in strategies.items():
            generate(model, prompts, strategy, 4)  # warm-up
            result, syncs = _with_sync_count(device, lambda: generate(model, prompts, strategy, new))
            tps = result.decode_tokens_per_second
            full = full or tps
            rows.append(
                {
                    "batch": batch,
                    "strategy": name,
                    "tok_s": round(tps, 1),
                    "vs_full_depth": round(tps / full, 3),
                    "mean_exit_layer": round(result.mean_exit_layer, 2),
                    "acceptance": round(result.acceptance_rate, 3),
                    "host_syncs_per_step": round(syncs / (result.num_steps + 1), 2),
                }
            )
    print(json.dumps({"num_layers": config.num_layers, "exits": exits, "rows": rows}))
    return 0


def _with_sync_count(device, fn):
    """(fn(), host syncs it made): torch's own detector on CUDA, the calls that would sync on CPU."""
    import warnings

    import torch

    if device == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return out, sum("synchroniz" in str(w.message) for w in caught)
    from tests.sync_counter import SyncCounter

    with SyncCounter() as counter:
        out = fn()
    return out, counter.total


if __name__ == "__main__":
    sys.exit(main())
