"""Train the benchmark model built for early exit, and report its oracle bound.

    python benchmarks/train_benchmark_model.py --export benchmarks/model   # the shipped model, ~40 min on 2 cores
    python benchmarks/train_benchmark_model.py --candidate d8h192 --minutes 30
    python benchmarks/train_benchmark_model.py --minutes 1 --work-dir /tmp/bm   # a smoke run

The recipe that makes early layers agree with the last (LayerSkip, arXiv 2404.16710, and
CALM's self-distillation): every layer but the first is skipped by some sequences in
training, with a probability rising with depth (`--layer-dropout-max`, exponential scale),
so that later layers learn to refine rather than rewrite; exits at many depths share the
final layer's projection (a tied model, each exit with its own norm) and learn from the
labels and from the final layer's distribution (`--exit-distill-weight`); a rotational
curriculum trains half of the exits at each iteration, which halves their cost.

Training stops after --minutes (Megatron's --exit-duration-in-mins) or --train-iters,
whichever comes first; the cosine schedule spans --train-iters, so set it near what fits.
Then the oracle bound (`calibration.oracle_decode`: each token leaves at the shallowest
exit agreeing with the final layer, every exit tested at its cost) is measured on
held-out prompts, and printed with the bound per training minute, which is how candidates
are compared. `--export DIR` writes the model as Hugging Face safetensors (config.json,
model.safetensors, early_exit_heads.safetensors, tokenizer) with the training log, which
`benchmarks/inference_speed.py --hf DIR` and the transformers comparison read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.benchmark_inputs import BATCH_FLAGS, PRETRAIN_SCHEDULE, data_flags, log  # noqa: E402

SHAPE = [
    "--seq-length",
    "256",
    "--max-position-embeddings",
    "256",
    "--normalization",
    "RMSNorm",
    "--swiglu",
    "--position-embedding-type",
    "rope",
    "--disable-bias-linear",
    "--hidden-dropout",
    "0",
    "--attention-dropout",
    "0",
]

# Candidates: deeper and narrower than the 8-layer hidden-192 model, where later layers add less.
CANDIDATES = {
    "d12h128": [
        "--num-layers",
        "12",
        "--hidden-size",
        "128",
        "--ffn-hidden-size",
        "352",
        "--num-attention-heads",
        "4",
        "--exit-layer-nums",
        "2",
        "3",
        "4",
        "6",
        "8",
        "10",
    ],
    "d16h128": [
        "--num-layers",
        "16",
        "--hidden-size",
        "128",
        "--ffn-hidden-size",
        "352",
        "--num-attention-heads",
        "4",
        "--exit-layer-nums",
        "2",
        "3",
        "4",
        "6",
        "8",
        "11",
        "14",
    ],
    "d8h192": [
        "--num-layers",
        "8",
        "--hidden-size",
        "192",
        "--ffn-hidden-size",
        "512",
        "--num-attention-heads",
        "6",
        "--exit-layer-nums",
        "2",
        "3",
        "4",
        "6",
    ],
}

RECIPE = [
    "--use-exit-norm",
    "--layer-dropout-max",
    "0.2",
    "--layer-dropout-style",
    "exp",
    "--exit-curriculum",
    "rotational",
    "--exit-curriculum-rotation",
    "2",
    "--exit-distill-weight",
    "0.5",
    "--exit-distill-warmup-iters",
    "100",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidate", choices=sorted(CANDIDATES), default="d12h128")
    p.add_argument(
        "--minutes", type=float, default=60.0, help="training time limit (the data pipeline's setup not counted)"
    )
    p.add_argument(
        "--train-iters", type=int, default=1400, help="iterations of the learning-rate schedule (and at most)"
    )
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "benchmark_model"))
    p.add_argument("--export", default=None, help="write the trained model here as Hugging Face safetensors")
    p.add_argument("--num-prompts", type=int, default=8, help="held-out prompts for the oracle bound")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads while training")
    return p.parse_args(argv)


def train(args, files: dict, save: str, log_path: str) -> float:
    """pretrain_early_exit_gpt.py in a subprocess (its output to the console and `log_path`); minutes taken."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "pretrain_early_exit_gpt.py"),
        *CANDIDATES[args.candidate],
        *SHAPE,
        *RECIPE,
        *BATCH_FLAGS,
        *PRETRAIN_SCHEDULE,
        "--train-iters",
        str(args.train_iters),
        "--exit-duration-in-mins",
        str(args.minutes),
        *data_flags(files, args.work_dir),
        "--save",
        save,
        "--save-interval",
        "100000",
    ]
    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS=str(args.threads),
        CUDA_VISIBLE_DEVICES="",
    )
    start = time.time()
    with open(log_path, "w") as out:
        out.write(" ".join(cmd[1:]) + "\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if "iteration" in line or "error" in line.lower():
                print("  " + line.rstrip(), flush=True)
    if proc.wait():
        sys.exit(f"training failed (exit code {proc.returncode}); see {log_path}")
    return (time.time() - start) / 60


def oracle_bound(ckpt: str, files: dict, args):
    import torch

    from benchmarks.benchmark_inputs import held_out_prompts
    from megatron.early_exit.inference.calibration import oracle_decode
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    initialize_parallel(1, 1)
    model, tokenizer, _ = load_model(ckpt)
    torch.set_num_threads(1)
    prompts = held_out_prompts(tokenizer, files["jsonl"], args.num_prompts, 48)
    return oracle_decode(model, prompts, None, args.max_new_tokens, "max_prob", 1, "cpu")


def export(ckpt: str, files: dict, log_path: str, out_dir: str) -> None:
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "checkpoint", "convert_hf.py"),
            "--direction",
            "to-hf",
            "--load",
            ckpt,
            "--save",
            tmp,
            "--no-progress",
        ],
        cwd=ROOT,
        check=True,
    )
    shutil.copy(log_path, os.path.join(tmp, "training_log.txt"))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)) / 2**20
    log(f"exported to {out_dir} ({size:.1f} MiB)")


def main(argv=None):
    args = parse_args(argv)
    from benchmarks.benchmark_inputs import prepare_corpus

    os.makedirs(args.work_dir, exist_ok=True)
    files = prepare_corpus(args.work_dir)
    save = os.path.join(args.work_dir, args.candidate)
    log_path = os.path.join(args.work_dir, f"{args.candidate}_train.log")
    shutil.rmtree(save, ignore_errors=True)
    log(f"training {args.candidate} for at most {args.minutes:g} minutes / {args.train_iters} iterations -> {save}")
    minutes = train(args, files, save, log_path)
    oracle = oracle_bound(save, files, args)
    log(
        f"candidate {args.candidate}: oracle bound {oracle.speedup:.2f}x after {minutes:.1f} training minutes "
        f"({oracle.speedup / minutes:.3f}x per minute); mean exit {oracle.mean_exit_layer:.2f}; exits take "
        + ", ".join(f"[{n}] {c:.0%}" for n, c in oracle.coverage.items())
    )
    with open(log_path, "a") as out:
        out.write(
            f"oracle bound {oracle.speedup:.3f}x, mean exit {oracle.mean_exit_layer:.3f}, training {minutes:.1f} min, "
            f"coverage {dict(oracle.coverage)}\n"
        )
    if args.export:
        export(save, files, log_path, args.export)


if __name__ == "__main__":
    main()
