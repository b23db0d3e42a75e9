"""The inputs the decoding and serving benchmarks share: the corpus (the Python standard
library's sources), its SentencePiece tokenizer and .bin/.idx, a model trained on it in
process (and its exits distilled), and prompts held out from it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL_FLAGS = [
    # A vocabulary of 2048 keeps each exit's projection near one layer's cost at this width.
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
    "--max-position-embeddings",
    "256",
    "--normalization",
    "RMSNorm",
    "--swiglu",
    "--position-embedding-type",
    "rope",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--hidden-dropout",
    "0",
    "--attention-dropout",
    "0",
    "--exit-layer-nums",
    "2",
    "4",
    "6",
    "--exit-layer-weight",
    "1.0",
    "1.0",
    "1.0",
    "--use-exit-norm",
]


# The batch and optimiser every benchmark model trains with, and the pretraining schedule
# (train_model here, benchmarks/train_benchmark_model.py).
BATCH_FLAGS = ["--micro-batch-size", "8", "--global-batch-size", "16", "--adam-beta2", "0.95", "--clip-grad", "1.0"]
PRETRAIN_SCHEDULE = [
    "--lr",
    "2e-3",
    "--min-lr",
    "2e-4",
    "--lr-decay-style",
    "cosine",
    "--lr-warmup-iters",
    "20",
    "--weight-decay",
    "0.1",
    "--seed",
    "1234",
]


def data_flags(files: dict, work_dir: str) -> list:
    """The corpus of `prepare_corpus`, its tokenizer, and logging without validation."""
    return [
        "--data-path",
        files["data"],
        "--split",
        "98,2,0",
        "--data-cache-path",
        os.path.join(work_dir, "cache"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        files["tokenizer"],
        "--log-interval",
        "25",
        "--eval-iters",
        "0",
    ]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data and model -----------------------------------------------------------------------


def write_random_checkpoint(root: str, flags: list, padded_vocab_size: int) -> None:
    """A freshly initialised model of the training `flags` (one process), saved under `root`."""
    import torch

    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import build_model

    config = parse_run_config(flags, world_size=1)
    save_weights(root, config.flags, build_model(config, torch.device("cpu"), padded_vocab_size), iteration=1)


def run_tool(*argv) -> None:
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True)


def converted_hf(hf_dir: str, work_dir: str) -> str:
    """Our checkpoint of a Hugging Face export with exits (benchmarks/model), converted once into
    WORK_DIR/from_hf by tools/checkpoint/convert_hf.py."""
    ckpt = os.path.join(work_dir, "from_hf")
    if not os.path.exists(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
        os.makedirs(work_dir, exist_ok=True)
        run_tool("tools/checkpoint/convert_hf.py", "--load", hf_dir, "--save", ckpt, "--no-progress")
    return ckpt


def prepare_corpus(work_dir: str) -> dict:
    """Corpus jsonl, tokenizer and .bin/.idx prefix (built once per work dir)."""
    files = {
        "jsonl": os.path.join(work_dir, "stdlib.jsonl"),
        "text": os.path.join(work_dir, "stdlib.txt"),
        "tokenizer": os.path.join(work_dir, "tokenizer.model"),
        "data": os.path.join(work_dir, "stdlib_text_document"),
    }
    if not os.path.exists(files["jsonl"]):
        log("building the corpus from the standard library")
        run_tool(
            "tools/build_corpus_from_stdlib.py",
            "--output",
            files["jsonl"],
            "--text-output",
            files["text"],
            "--max-mb",
            "6",
        )
    if not os.path.exists(files["tokenizer"]):
        log("training the SentencePiece tokenizer")
        run_tool(
            "tools/train_tokenizer.py",
            "--input",
            files["text"],
            "--model-prefix",
            files["tokenizer"][: -len(".model")],
            "--vocab-size",
            "2048",
        )
    if not os.path.exists(files["data"] + ".bin"):
        log("preprocessing to .bin/.idx")
        run_tool(
            "tools/preprocess_data.py",
            "--input",
            files["jsonl"],
            "--output-prefix",
            files["data"][: -len("_text_document")],
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            files["tokenizer"],
            "--append-eod",
            "--workers",
            "2",
        )
    return files


def trained_iterations(ckpt: str) -> int:
    marker = os.path.join(ckpt, "latest_checkpointed_iteration.txt")
    return int(open(marker).read()) if os.path.exists(marker) else 0


def _pretrain(work_dir: str, files: dict, save: str, flags: list) -> None:
    """pretrain_early_exit_gpt.py in this process: the model, `flags`, then data and saving."""
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import pretrain

    pretrain(
        parse_run_config(
            MODEL_FLAGS
            + flags
            + BATCH_FLAGS
            + data_flags(files, work_dir)
            + ["--save", save, "--save-interval", "100"],
            world_size=1,
        )
    )


def train_model(work_dir: str, files: dict, train_iters: int) -> str:
    """Train (or, with a shorter run already saved there, resume) the benchmark's model."""
    save = os.path.join(work_dir, "checkpoints")
    done = trained_iterations(save)
    log(f"training an early-exit model on CPU, iterations {done} -> {train_iters} (saved to {save})")
    _pretrain(
        work_dir,
        files,
        save,
        (["--load", save] if done else []) + ["--train-iters", str(train_iters)] + PRETRAIN_SCHEDULE,
    )
    return save


def distill_exits(work_dir: str, files: dict, base: str, iters: int) -> str:
    """EE-Tuning with self-distillation: untied exits copied from the final layer, trained
    towards its distribution with the backbone frozen (or resumed)."""
    init, save = os.path.join(work_dir, "ee_tuning_init"), os.path.join(work_dir, "distilled")
    if not os.path.exists(os.path.join(init, "latest_checkpointed_iteration.txt")):
        log(f"copying the final norm and output layer into untied exits: {init}")
        run_tool(
            "tools/checkpoint/add_exits.py",
            "--load",
            base,
            "--save",
            init,
            "--exit-layer-nums",
            "2",
            "4",
            "6",
            "--use-exit-norm",
            "--untie-exit-output-weights",
        )
    done = trained_iterations(save)
    if done >= iters:
        return save
    log(f"EE-Tuning the exits with self-distillation, iterations {done} -> {iters} (saved to {save})")
    _pretrain(
        work_dir,
        files,
        save,
        (["--load", save] if done else ["--load", init, "--finetune"])
        + [
            "--untie-exit-output-weights",
            "--tune-exit",
            "--exit-distill-weight",
            "1.0",
            "--train-iters",
            str(iters),
            "--lr",
            "1e-3",
            "--min-lr",
            "1e-4",
            "--lr-decay-style",
            "cosine",
            "--lr-warmup-iters",
            "10",
            "--weight-decay",
            "0.0",
            "--seed",
            "4321",
        ],
    )
    return save


def held_out_sources(corpus_jsonl: str) -> list:
    """The standard-library modules (paths, in a fixed order) that the training corpus left out."""
    seen = {json.loads(line)["source"] for line in open(corpus_jsonl)}
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("test", "tests", "site-packages", "idle_test", "__pycache__")
        )
        paths += [
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if f.endswith(".py") and os.path.relpath(os.path.join(dirpath, f), root) not in seen
        ]
    return paths


def held_out_prompts(tokenizer, corpus_jsonl: str, num_prompts: int, prompt_tokens: int, seed: int = 0):
    """Prompts from standard-library modules that the training corpus left out."""
    candidates = held_out_sources(corpus_jsonl)
    rng = random.Random(seed)
    prompts = []
    for path in rng.sample(candidates, len(candidates)):
        lines = open(path, encoding="utf-8", errors="replace").read().splitlines(keepends=True)
        if len(lines) < 40:
            continue
        start = rng.randrange(10, len(lines) - 20)
        ids = tokenizer.tokenize("".join(lines[start : start + 20]))
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == num_prompts:
            return prompts
    return prompts
