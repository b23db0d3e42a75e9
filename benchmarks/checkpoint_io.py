"""Time saving and loading a checkpoint of the quick-start model (8 layers, hidden 192,
vocab 4096, exits at 2 and 4) with its Adam state, in one process.

    python benchmarks/checkpoint_io.py [--repeats 3] [--dir /tmp/ckpt_bench]

Prints seconds per save and per load (model + optimizer + scheduler + RNG), the size on
disk and the throughput, and the weights-only save for comparison.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUICKSTART = [
    "--num-layers", "8", "--hidden-size", "192", "--ffn-hidden-size", "512", "--num-attention-heads", "6",
    "--seq-length", "256", "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--exit-layer-nums", "2", "4",
    "--exit-layer-weight", "0.25", "0.5", "--use-exit-norm", "--micro-batch-size", "4", "--train-iters", "10",
    "--lr", "2e-3", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "4096",
]


def size_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**20


def main():
    import torch

    import megatron.early_exit  # noqa: F401
    from megatron.early_exit.parallel import initialize_parallel
    from megatron.early_exit.training import checkpointing
    from megatron.early_exit.training.arguments import parse_args
    from megatron.early_exit.training.trainer import build_model, build_optimizer, wrap_model

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None)
    a = p.parse_args()
    root = a.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
    torch.set_num_threads(2)
    initialize_parallel(1, 1, seed=1234, device="cpu")

    def build():
        args = parse_args(QUICKSTART + ["--save", root, "--load", root], world_size=1)
        model = wrap_model(build_model(args, torch.device("cpu"), 4096), args)
        optimizer, scheduler = build_optimizer(model, args)
        return args, model, optimizer, scheduler

    args, model, optimizer, scheduler = build()
    for param in model.parameters():  # one step so that Adam has its state
        param.main_grad.normal_()
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f} M parameters (quick-start shape), directory {root}", flush=True)

    saves, loads = [], []
    for i in range(a.repeats):
        start = time.time()
        checkpointing.save(args, model, optimizer, scheduler, i + 1, 0)
        saves.append(time.time() - start)
        fresh = build()
        start = time.time()
        checkpointing.load(*fresh)
        loads.append(time.time() - start)
        print(f"  repeat {i + 1}/{a.repeats}: save {saves[-1]:.2f} s, load {loads[-1]:.2f} s", flush=True)
    full = size_mb(checkpointing.checkpoint_dir(root, a.repeats))
    start = time.time()
    weights = checkpointing.save_weights(os.path.join(root, "weights"), args, model)
    weights_s = time.time() - start
    best_save, best_load = min(saves), min(loads)
    print(f"full checkpoint   {full:7.1f} MB   save {best_save:.2f} s ({full / best_save:.0f} MB/s)   "
          f"load {best_load:.2f} s ({full / best_load:.0f} MB/s)")
    print(f"weights only      {size_mb(weights):7.1f} MB   save {weights_s:.2f} s")
    print(f"load / save time ratio: {best_load / best_save:.2f}")
    if a.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
