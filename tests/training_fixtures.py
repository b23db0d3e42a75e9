"""A tiny learnable corpus and the flags of a tiny training run, shared by training tests."""

import json
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64


def write_corpus(directory: str, name: str = "corpus", seed: int = 0, num_docs: int = 300) -> str:
    """Arithmetic progressions modulo VOCAB-1 as NullTokenizer text: easy to learn, so
    losses fall fast. Returns the preprocessed prefix."""
    rng = random.Random(seed)
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w") as f:
        for _ in range(num_docs):
            start, step = rng.randrange(VOCAB - 1), rng.choice([1, 2, 3])
            ids = [(start + i * step) % (VOCAB - 1) for i in range(rng.randrange(40, 120))]
            f.write(json.dumps({"text": " ".join(map(str, ids))}) + "\n")
    prefix = os.path.join(directory, name)
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "preprocess_data.py"),
            "--input",
            path,
            "--output-prefix",
            prefix,
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            str(VOCAB),
            "--append-eod",
            "--workers",
            "1",
        ],
        check=True,
        capture_output=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    return prefix + "_text_document"


def tiny_run_flags(data_prefix=None, iters=30, **overrides):
    flags = {
        "--num-layers": 4,
        "--hidden-size": 32,
        "--num-attention-heads": 4,
        "--seq-length": 32,
        "--micro-batch-size": 2,
        "--global-batch-size": 8,
        "--train-iters": iters,
        "--lr": 1e-2,
        "--min-lr": 1e-3,
        "--lr-decay-style": "cosine",
        "--lr-warmup-iters": 2,
        "--weight-decay": 0.01,
        "--clip-grad": 1.0,
        "--normalization": "RMSNorm",
        "--position-embedding-type": "rope",
        "--hidden-dropout": 0.0,
        "--attention-dropout": 0.0,
        "--seed": 5,
        "--exit-layer-nums": "1 2",
        "--exit-layer-weight": "0.5 0.5",
        "--use-exit-norm": None,
        "--swiglu": None,
        "--disable-bias-linear": None,
        "--log-interval": 10,
        "--eval-interval": 15,
        "--eval-iters": 2,
        "--tokenizer-type": "NullTokenizer",
        "--vocab-size": VOCAB,
        "--split": "90,10,0",
        "--make-vocab-size-divisible-by": 32,
    }
    if data_prefix is not None:
        flags["--data-path"] = data_prefix
    flags.update(overrides)
    argv = []
    for k, v in flags.items():
        if v is False:
            continue
        argv.append(k)
        if v is not None:
            argv += str(v).split()
    return argv


def run_training(argv):
    """A one-process pretraining run of `argv` (flags): its final training state."""
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import pretrain

    return pretrain(parse_run_config(argv, world_size=1))
