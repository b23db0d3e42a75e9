"""Time saving and loading a checkpoint of the quick-start model (8 layers, hidden 192,
vocab 4096, exits at 2 and 4) with its Adam state, in one process.

    python benchmarks/checkpoint_io.py [--repeats 3] [--dir /tmp/ckpt_bench] [--hidden-size 192]

Prints seconds per save and per load (model + optimizer + scheduler + RNG), the size on
disk and the throughput, and the weights-only save for comparison; each with and without
the per-file checksums (CRC-32, written at save, verified at load), and their cost as a
ratio. --hidden-size scales the model (and --ffn-hidden-size with it) for larger files.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUICKSTART = [
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
    "--position-embedding-type",
    "rope",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--exit-layer-nums",
    "2",
    "4",
    "--exit-layer-weight",
    "0.25",
    "0.5",
    "--use-exit-norm",
    "--micro-batch-size",
    "4",
    "--train-iters",
    "10",
    "--lr",
    "2e-3",
    "--mock-data",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "4096",
]


def size_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**20


def main():
    import torch

    import megatron.early_exit  # noqa: F401

    # isort: split
    from megatron.early_exit.checkpoint.checksums import file_checksum
    from megatron.early_exit.checkpoint.reader import checkpoint_dir
    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.parallel import initialize_parallel
    from megatron.early_exit.training import checkpointing
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import build_model, build_optimizer, wrap_model

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None)
    p.add_argument("--hidden-size", type=int, default=192)
    a = p.parse_args()
    root = a.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
    torch.set_num_threads(2)
    initialize_parallel(1, 1, seed=1234, device="cpu")
    shape = ["--hidden-size", str(a.hidden_size), "--ffn-hidden-size", str(a.hidden_size * 8 // 3)]

    def build():
        config = parse_run_config(QUICKSTART + shape + ["--save", root, "--load", root], world_size=1)
        model = wrap_model(build_model(config, torch.device("cpu"), 4096), config)
        optimizer, scheduler = build_optimizer(model, config)
        return config, model, optimizer, scheduler

    config, model, optimizer, scheduler = build()
    for param in model.parameters():  # one step so that Adam has its state
        param.main_grad.normal_()
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {params / 1e6:.2f} M parameters (quick-start shape, hidden {a.hidden_size}), directory {root}",
        flush=True,
    )

    times = {True: ([], []), False: ([], [])}  # checksums -> (saves, loads)
    iteration = 0
    for i in range(a.repeats):
        for checksums in (True, False) if i % 2 else (False, True):
            iteration += 1
            start = time.time()
            checkpointing.save(config, model, optimizer, scheduler, iteration, 0, checksums=checksums)
            times[checksums][0].append(time.time() - start)
            fresh = build()
            start = time.time()
            checkpointing.load(*fresh, checksums=checksums)
            times[checksums][1].append(time.time() - start)
            print(
                f"  repeat {i + 1}/{a.repeats}, checksums {'on ' if checksums else 'off'}: save "
                f"{times[checksums][0][-1]:.3f} s, "
                f"load {times[checksums][1][-1]:.3f} s",
                flush=True,
            )
    path = checkpoint_dir(root, iteration - 1)
    full = size_mb(path)
    start = time.time()
    for name in os.listdir(path):
        file_checksum(os.path.join(path, name))
    crc_s = time.time() - start
    start = time.time()
    weights = save_weights(os.path.join(root, "weights"), config.flags, model)
    weights_s = time.time() - start
    (save_on, load_on), (save_off, load_off) = [(min(times[c][0]), min(times[c][1])) for c in (True, False)]
    print(
        f"full checkpoint   {full:7.1f} MB   save {save_on:.3f} s ({full / save_on:.0f} MB/s)   "
        f"load {load_on:.3f} s ({full / load_on:.0f} MB/s)   (checksums on)"
    )
    print(
        f"                                 save {save_off:.3f} s ({full / save_off:.0f} MB/s)   "
        f"load {load_off:.3f} s ({full / load_off:.0f} MB/s)   (checksums off)"
    )
    print(
        f"checksums cost    save x{save_on / save_off:.2f}, load x{load_on / load_off:.2f} "
        f"(CRC-32 of the files alone: {crc_s:.3f} s, {full / max(crc_s, 1e-9):.0f} MB/s, from the page cache)"
    )
    print(f"weights only      {size_mb(weights):7.1f} MB   save {weights_s:.3f} s")
    print(f"load / save time ratio: {load_on / save_on:.2f}")
    if a.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
