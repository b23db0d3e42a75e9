"""CPU peak memory of training steps with and without full activation recomputation.

    python benchmarks/memory_recompute.py [--num-layers 8] [--seq-length 512] ...

Each configuration runs two training iterations (the second holds the optimizer state
created by the first) in a fresh process; its peak is measured as below and printed
beside the estimate of tools/estimate_memory.py, with the ratio of the peaks.

How the peak is measured (`measure_peak`): tracemalloc does not see PyTorch's
allocations, and PyTorch keeps no allocator statistics for the CPU, so the child reads
the kernel's resident-set high-water mark (VmHWM in /proc/self/status). It resets that
mark (writing 5 to /proc/self/clear_refs) just before the model is built, so the peak
counts the model, its gradients and optimizer state and the steps' activations, not the
imports. glibc's malloc is pinned to return every block of 128 KiB or more to the kernel
when it is freed (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors
instead of a heap that only grows.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
    "MALLOC_ARENA_MAX": "2",
    "OMP_NUM_THREADS": "1",
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def _child(argv, out_dir):
    """In the measured process: train, counting the peak from just before the model is built."""
    import torch

    from megatron.early_exit.training import trainer
    from megatron.early_exit.training.arguments import parse_run_config

    build = trainer.build_model
    base = {}

    def build_after_reset(*args, **kwargs):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base["kib"] = _rss_kib("VmRSS")
        return build(*args, **kwargs)

    trainer.build_model = build_after_reset
    state = trainer.pretrain(parse_run_config(argv))
    rank = torch.distributed.get_rank()
    peak = (_rss_kib("VmHWM") - base["kib"]) * 1024
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"peak_bytes": peak, "lm_loss": state.history[-1].get("lm loss")}, f)


def measure_peak(argv, nproc: int = 1, timeout: int = 600):
    """Peak bytes above the pre-model resident set of each rank of a training run of
    `argv` (training flags), run in fresh processes (torchrun when nproc > 1)."""
    with tempfile.TemporaryDirectory() as out_dir:
        script = [os.path.abspath(__file__), "--child", out_dir, "--", *argv]
        launcher = (
            [sys.executable]
            if nproc == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        )
        # A fresh rendezvous: the caller's MASTER_PORT (a test process's own group) is taken.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        }
        env.update(PYTHONWARNINGS="ignore", **MALLOC_ENV)
        proc = subprocess.run(launcher + script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"measured run failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return [json.load(open(os.path.join(out_dir, f"rank{r}.json")))["peak_bytes"] for r in range(nproc)]


def run_flags(num_layers, hidden, ffn, heads, vocab, seq, micro_batch, exits, recompute=(), pp=1, microbatches=1):
    flags = [
        "--num-layers",
        num_layers,
        "--hidden-size",
        hidden,
        "--ffn-hidden-size",
        ffn,
        "--num-attention-heads",
        heads,
        "--seq-length",
        seq,
        "--micro-batch-size",
        micro_batch,
        "--global-batch-size",
        micro_batch * microbatches,
        "--train-iters",
        2,
        "--lr",
        1e-4,
        "--normalization",
        "RMSNorm",
        "--swiglu",
        "--disable-bias-linear",
        "--position-embedding-type",
        "rope",
        "--hidden-dropout",
        0,
        "--attention-dropout",
        0,
        "--mock-data",
        "--vocab-size",
        vocab,
        "--make-vocab-size-divisible-by",
        128,
        "--eval-iters",
        0,
        "--log-interval",
        1,
        "--device",
        "cpu",
        "--pipeline-model-parallel-size",
        pp,
        *recompute,
    ]
    if exits:
        flags += ["--exit-layer-nums", *exits, "--use-exit-norm"]
    return [str(f) for f in flags]


def estimate_flags(argv, world_size: int = 1):
    """The estimate (tools/estimate_memory.py's) of the same flags, per stage, in bytes."""
    from megatron.early_exit.memory import estimate
    from tools.estimate_memory import shape_of

    model, shape = shape_of(argv, world_size)
    return [st.total for st in estimate(model, shape)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--ffn-hidden-size", type=int, default=704)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    a = p.parse_args()
    shape = (
        a.num_layers,
        a.hidden_size,
        a.ffn_hidden_size,
        a.num_attention_heads,
        a.vocab_size,
        a.seq_length,
        a.micro_batch_size,
        [2, a.num_layers // 2],
    )
    settings = [
        ("none", []),
        (
            "full, uniform 1",
            [
                "--recompute-granularity",
                "full",
                "--recompute-method",
                "uniform",
                "--recompute-num-layers",
                "1",
                "--recompute-exit-heads",
            ],
        ),
    ]
    print(f"{'recomputation':>18} {'measured MB':>12} {'estimated MB':>13}")
    peaks = []
    for name, flags in settings:
        argv = run_flags(*shape, recompute=flags)
        peak = measure_peak(argv)[0]
        peaks.append(peak)
        print(f"{name:>18} {peak / 1e6:12.1f} {estimate_flags(argv)[0] / 1e6:13.1f}", flush=True)
    print(f"peak with full recomputation / without: {peaks[1] / peaks[0]:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[4:], sys.argv[2])
    else:
        main()
