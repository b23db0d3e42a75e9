"""Decoding speed: full depth against early exit (KV recomputation, state propagation)
across thresholds, and self-speculative decoding, on a trained early-exit model.

    python benchmarks/inference_speed.py                        # trains a model first (CPU, minutes)
    python benchmarks/inference_speed.py --load runs/quickstart/checkpoints

Without --load, a model is trained in-process on the Python standard library's sources
(corpus, SentencePiece tokenizer and .bin/.idx are built with the tools in tools/, or
reused from a previous run in --work-dir) and saved there, so a second run only decodes
(or resumes training when --train-iters asks for more iterations than were saved).
Prompts are held out: stdlib modules that the training corpus does not contain.

Each strategy decodes every prompt alone (batch size 1, greedy). Columns: decode
tokens/s; speedup over full depth; agreement (fraction of positions with the full-depth
token); consistency (fraction of tokens the full model would pick after the same prefix);
mean exit layer; ideal speedup (num_layers / mean exit layer: what skipping
layers alone would give); achieved / ideal; accepted drafts (self-speculative).
"""

from __future__ import annotations

import argparse
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
    "--num-layers", "8", "--hidden-size", "192", "--ffn-hidden-size", "512", "--num-attention-heads", "6",
    "--seq-length", "256", "--max-position-embeddings", "256",
    "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--exit-layer-nums", "2", "4", "6", "--exit-layer-weight", "1.0", "1.0", "1.0", "--use-exit-norm",
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default=None, help="checkpoint directory (--save of pretrain_early_exit_gpt.py)")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "inference_speed"))
    p.add_argument("--train-iters", type=int, default=1000)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    p.add_argument("--measure", default="max_prob")
    p.add_argument("--kv", nargs="+", default=["recompute", "propagate"])
    # Each active exit costs about a layer per token when it does not fire (its vocabulary
    # projection and softmax), so the deepest exit of the trained model is left out.
    p.add_argument("--exit-layers", type=int, nargs="*", default=[2, 4], help="active exits (given with no value: all)")
    p.add_argument("--speculative", nargs="*", default=["2:2", "2:3", "2:4", "4:4"], help="EXIT:NUM_DRAFT pairs")
    p.add_argument("--repeats", type=int, default=3, help="timings per prompt; the fastest counts")
    p.add_argument("--threads", type=int, default=1, help="torch threads while decoding")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine)")
    return p.parse_args()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data and model -----------------------------------------------------------------------


def _run_tool(*argv) -> None:
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True)


def prepare_corpus(work_dir: str) -> dict:
    """Corpus jsonl, tokenizer and .bin/.idx prefix (built once per work dir)."""
    files = {"jsonl": os.path.join(work_dir, "stdlib.jsonl"), "text": os.path.join(work_dir, "stdlib.txt"),
             "tokenizer": os.path.join(work_dir, "tokenizer.model"), "data": os.path.join(work_dir, "stdlib_text_document")}
    if not os.path.exists(files["jsonl"]):
        log("building the corpus from the standard library")
        _run_tool("tools/build_corpus_from_stdlib.py", "--output", files["jsonl"], "--text-output", files["text"], "--max-mb", "6")
    if not os.path.exists(files["tokenizer"]):
        log("training the SentencePiece tokenizer")
        _run_tool("tools/train_tokenizer.py", "--input", files["text"], "--model-prefix", files["tokenizer"][: -len(".model")],
                  "--vocab-size", "2048")
    if not os.path.exists(files["data"] + ".bin"):
        log("preprocessing to .bin/.idx")
        _run_tool("tools/preprocess_data.py", "--input", files["jsonl"], "--output-prefix", files["data"][: -len("_text_document")],
                  "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", files["tokenizer"], "--append-eod", "--workers", "2")
    return files


def trained_iterations(ckpt: str) -> int:
    marker = os.path.join(ckpt, "latest_checkpointed_iteration.txt")
    return int(open(marker).read()) if os.path.exists(marker) else 0


def train_model(work_dir: str, files: dict, train_iters: int) -> str:
    """Train (or, with a shorter run already saved there, resume) the benchmark's model."""
    from megatron.early_exit.training.arguments import parse_args as parse_train_args
    from megatron.early_exit.training.trainer import pretrain

    save = os.path.join(work_dir, "checkpoints")
    done = trained_iterations(save)
    log(f"training an early-exit model on CPU, iterations {done} -> {train_iters} (saved to {save})")
    resume = ["--load", save] if done else []
    pretrain(parse_train_args(MODEL_FLAGS + resume + [
        "--micro-batch-size", "8", "--global-batch-size", "16", "--train-iters", str(train_iters),
        "--lr", "2e-3", "--min-lr", "2e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20",
        "--weight-decay", "0.1", "--adam-beta2", "0.95", "--clip-grad", "1.0", "--seed", "1234",
        "--data-path", files["data"], "--split", "98,2,0", "--data-cache-path", os.path.join(work_dir, "cache"),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", files["tokenizer"],
        "--log-interval", "25", "--eval-iters", "0", "--save", save, "--save-interval", "100",
    ], world_size=1))
    return save


def held_out_prompts(tokenizer, corpus_jsonl: str, num_prompts: int, prompt_tokens: int, seed: int = 0):
    """Prompts from standard-library modules that the training corpus left out."""
    seen = {json.loads(line)["source"] for line in open(corpus_jsonl)}
    root = sysconfig.get_paths()["stdlib"]
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "site-packages", "idle_test", "__pycache__"))
        candidates += [os.path.join(dirpath, f) for f in sorted(filenames)
                       if f.endswith(".py") and os.path.relpath(os.path.join(dirpath, f), root) not in seen]
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


# -- the benchmark ------------------------------------------------------------------------


def main():
    args = parse_args()
    import torch

    import megatron.early_exit  # noqa: F401  (platform adapter)
    from megatron.early_exit.inference import EarlyExit, SelfSpeculative
    from megatron.early_exit.inference.calibration import format_table, pick_fastest, sweep
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    os.makedirs(args.work_dir, exist_ok=True)
    files = prepare_corpus(args.work_dir)
    ckpt = args.load
    if ckpt is None:
        ckpt = os.path.join(args.work_dir, "checkpoints")
        if trained_iterations(ckpt) < args.train_iters:
            train_model(args.work_dir, files, args.train_iters)
    initialize_parallel(1, 1)
    model, tokenizer, train_args = load_model(ckpt)
    torch.set_num_threads(args.threads)
    prompts = held_out_prompts(tokenizer, files["jsonl"], args.num_prompts, args.prompt_tokens)
    exits = tuple(args.exit_layers) if args.exit_layers else None  # --exit-layers with no value: all
    strategies = [EarlyExit(t, args.measure, kv, exits) for kv in args.kv for t in args.thresholds]
    strategies += [SelfSpeculative(int(e), int(k)) for e, k in (s.split(":") for s in args.speculative)]
    log(f"model: {train_args.num_layers} layers, hidden {train_args.hidden_size}, exits {train_args.exit_layer_nums}, "
        f"vocab {model.vocab_size}; {len(prompts)} held-out prompts of {args.prompt_tokens} tokens, "
        f"{args.max_new_tokens} new tokens each, measure {args.measure}, {args.threads} thread(s), {args.clock} clock")
    points = sweep(model, prompts, strategies, args.max_new_tokens, args.repeats, clock=args.clock, progress=log)

    print("\n" + format_table(points))
    early = [p for p in points if p.ideal_speedup is not None and p.threshold is not None]
    spec = [p for p in points if p.acceptance is not None]
    print("\ngoals:")
    for criterion in ("agreement", "consistency"):
        best = pick_fastest(early, 0.95, criterion)
        if best:
            print(f"  fastest early exit with {criterion} >= 0.95: {best.strategy} threshold {best.threshold}: "
                  f"{best.speedup:.2f}x (goal >= 1.5x), achieved/ideal {best.efficiency:.2f} (goal >= 0.8)")
        else:
            print(f"  no early-exit threshold reached {criterion} 0.95")
    if spec:
        top = max(spec, key=lambda p: p.speedup)
        print(f"  best self-speculative: {top.strategy}: {top.speedup:.2f}x (goal >= 1.2x), agreement {top.agreement:.3f} "
              f"(must be 1.000), accepted {top.acceptance:.2f}")


if __name__ == "__main__":
    main()
