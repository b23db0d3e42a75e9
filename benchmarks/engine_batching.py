"""Early exit inside the continuous batch, at the engine (no HTTP): does early exit keep its
batch-1 speedup at batch 8, and does regrouping the rows going on past an exit (DREX,
arXiv 2512.15705: `Engine(regroup="drex")`) beat running them at once?

    python benchmarks/engine_batching.py --hf benchmarks/model

Every configuration decodes the same held-out prompts (greedy, a fixed number of new
tokens, no stop token) through the engine, at batch 1 (one sequence at a time) and at
batch B (B sequences at once), all in this run; the best of --repeats timings counts
(taken round-robin over the configurations).
It prints decode tokens/s, the early-exit speedup over full depth at each batch size,
the share of the batch-1 speedup kept at batch B, DREX against running at once, and
where a step's time goes (layers; exits in all, of which exit tests) by timers around the decoder's
pieces.

    python benchmarks/engine_batching.py --random-hidden 512

decodes a random model of the shipped model's depth and exits at another width instead (hidden
512: a layer's cost follows its rows more than at 128), with per-exit margin thresholds set so
that --exit-shares of the tokens leave at each exit (a random model's confidences mean nothing;
the shares are what early exit in a batch is measured under). Prompts are random token ids.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.benchmark_inputs import log  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", default=os.path.join(ROOT, "benchmarks", "model"), help="Hugging Face export with exits")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "engine_batching"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threshold", type=float, default=0.2)
    p.add_argument("--measure", default="margin", help="confidence measure (inference_speed.py's default)")
    p.add_argument("--kv", default="recompute", choices=["recompute", "propagate"])
    p.add_argument("--exit-layers", type=int, nargs="*", default=[3, 6], help="active exits (no value: all)")
    p.add_argument("--max-wait", type=int, nargs="+", default=[1, 2, 4], help="DREX: steps a token may wait")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--random-hidden", type=int, default=None, help="a random model of this hidden size")
    p.add_argument(
        "--exit-shares",
        type=float,
        nargs="+",
        default=[0.6, 0.3],
        help="with --random-hidden: the share of tokens that leave at each exit (of those reaching it)",
    )
    return p.parse_args()


class Timers:
    """Wall time inside the decoder's pieces (wrapped methods; nested calls count once)."""

    PIECES = {"layers": "_run_layer", "exit tests": "_test", "exits in all": "_exit_rows", "regroup": "_join"}

    def __init__(self, decoder_cls):
        self.totals = collections.Counter()
        self.cls, self.saved = decoder_cls, {}
        for name, attr in self.PIECES.items():
            self.saved[attr] = getattr(decoder_cls, attr)
            setattr(decoder_cls, attr, self._wrap(name, self.saved[attr]))

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - start

        return timed

    def restore(self):
        for attr, fn in self.saved.items():
            setattr(self.cls, attr, fn)


def decode(model, prompts, strategy, batch: int, new_tokens: int, regroup: str, max_wait: int = 1):
    """(seconds, tokens, (mean exit depth, mean over steps of the deepest exit)) of decoding
    every prompt, `batch` at a time: a step runs as deep as its deepest row."""
    from megatron.early_exit.inference.engine import Engine, SequenceRequest

    engine = Engine(
        model, batch, max(len(p) for p in prompts) + new_tokens, prefill_chunk=4096, regroup=regroup, max_wait=max_wait
    )
    for prompt in prompts:
        engine.add(SequenceRequest(tuple(prompt), strategy, max_new_tokens=new_tokens))
    depths, deepest, start = [], [], time.perf_counter()
    while engine.has_work:
        step = [d for event in engine.step() for d in event.exit_layers]
        depths += step
        deepest += step[-1:] and [max(step)]
    mean = sum(depths) / max(len(depths), 1)
    return time.perf_counter() - start, len(depths), (mean, sum(deepest) / max(len(deepest), 1))


def random_model(args):
    """(model, prompts, early-exit strategy): a random model of the shipped model's depth and
    --exit-layers at --random-hidden, with per-exit thresholds that let --exit-shares leave."""
    import torch

    from benchmarks.benchmark_inputs import write_random_checkpoint
    from megatron.early_exit.inference import EarlyExit, FullDepth, generate
    from megatron.early_exit.inference.calibration import exit_confidences
    from megatron.early_exit.inference.confidence import get_confidence_measure
    from megatron.early_exit.inference.loading import load_model

    h, exits, vocab = args.random_hidden, args.exit_layers, 2048
    root = os.path.join(args.work_dir, f"random_h{h}_exits{'_'.join(map(str, exits))}")
    if not os.path.exists(os.path.join(root, "latest_checkpointed_iteration.txt")):
        flags = ["--num-layers", "12", "--hidden-size", str(h), "--num-attention-heads", str(max(1, h // 64))]
        flags += ["--seq-length", "256", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear"]
        flags += ["--position-embedding-type", "rope", "--exit-layer-nums", *map(str, exits), "--use-exit-norm"]
        flags += ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab), "--seed", "1"]
        flags += ["--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data"]
        write_random_checkpoint(root, flags, vocab)
    model = load_model(root)[0]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (args.num_prompts, args.prompt_tokens), generator=g).tolist()
    seqs = [p + generate(model, [p], FullDepth(), args.new_tokens).tokens[0] for p in prompts[:4]]
    confidence = exit_confidences(
        model, seqs, get_confidence_measure(args.measure, model), exits, [args.prompt_tokens - 1] * len(seqs)
    )
    thresholds, going = {}, None
    for n, share in zip(exits, args.exit_shares):
        c = confidence[n][0] if going is None else confidence[n][0][going]
        thresholds[n] = float(c.quantile(1 - share))
        fired = confidence[n][0] >= thresholds[n]
        going = ~fired if going is None else going & ~fired
    shown = {n: round(t, 4) for n, t in thresholds.items()}
    log(f"random model, hidden {h}: per-exit {args.measure} thresholds {shown} (shares {args.exit_shares})")
    return (
        model,
        prompts,
        EarlyExit(2.0, args.measure, kv=args.kv, exit_layers=tuple(exits), exit_thresholds=thresholds),
    )


def main():
    args = parse_args()
    import torch

    import megatron.early_exit  # noqa: F401  (platform adapter)

    # isort: split
    from benchmarks.benchmark_inputs import converted_hf, held_out_prompts, prepare_corpus
    from megatron.early_exit.inference import EarlyExit, FullDepth
    from megatron.early_exit.inference.decoder import Decoder
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    initialize_parallel(1, 1)
    torch.set_num_threads(args.threads)
    exits_on = tuple(args.exit_layers) if args.exit_layers else None
    if args.random_hidden:
        if not exits_on or len(args.exit_shares) != len(exits_on):
            raise SystemExit(
                "engine_batching.py: --random-hidden needs one --exit-shares value per --exit-layers entry"
            )
        model, prompts, early_exit = random_model(args)
    else:
        ckpt = converted_hf(args.hf, args.work_dir)
        files = prepare_corpus(args.work_dir)
        model, tokenizer, _ = load_model(ckpt)
        prompts = held_out_prompts(tokenizer, files["jsonl"], args.num_prompts, args.prompt_tokens)
        random.Random(0).shuffle(prompts)
        early_exit = EarlyExit(args.threshold, args.measure, kv=args.kv, exit_layers=exits_on)
    configs = {"full depth": (FullDepth(), "none", 1), "early exit": (early_exit, "none", 1)}
    configs.update({f"early exit, drex {w}": (early_exit, "drex", w) for w in args.max_wait})
    pairs = early_exit.exit_thresholds
    thresholds = {n: round(t, 4) for n, t in pairs} if pairs else args.threshold
    log(
        f"{len(prompts)} {'random' if args.random_hidden else 'held-out'} prompts of {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens each, {args.measure} >= "
        f"{thresholds} "
        f"({args.kv}, exits {exits_on or 'all'}), "
        f"{args.threads} thread(s), {model.config.num_layers} layers, hidden {model.config.hidden_size}"
    )
    decode(model, prompts[:2], FullDepth(), 2, 4, "none")  # warm-up
    speed, exits, shares = {}, {}, {}
    runs = [(batch, name) for batch in (1, args.batch) for name in configs if not (batch == 1 and "drex" in name)]
    best, timers = {}, Timers(Decoder)
    for repeat in range(args.repeats):  # round-robin: a drift of the machine's load hits every config alike
        for batch, name in runs:
            strategy, regroup, max_wait = configs[name]
            timers.totals.clear()
            seconds, tokens, depth = decode(model, prompts, strategy, batch, args.new_tokens, regroup, max_wait)
            if (batch, name) not in best or seconds < best[(batch, name)][0]:
                best[(batch, name)] = (seconds, tokens, depth, dict(timers.totals))
        log(f"repeat {repeat + 1}/{args.repeats} done")
    timers.restore()
    for (batch, name), (seconds, tokens, depth, share) in best.items():
        speed[(name, batch)], exits[(name, batch)] = tokens / seconds, depth
        shares[(name, batch)] = {k: v / seconds for k, v in share.items()}
    b = args.batch
    print(
        f"\n{'config':<20} {'batch':>5} {'tokens/s':>9} {'vs full':>8} {'mean exit':>9} {'step depth':>10}   time share"
    )
    for (name, batch), tps in speed.items():
        share = ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares[(name, batch)].items()) if v > 0)
        print(
            f"{name:<20} {batch:>5} {tps:>9.1f} {tps / speed[('full depth', batch)]:>7.2f}x "
            f"{exits[(name, batch)][0]:>9.2f} {exits[(name, batch)][1]:>10.2f}   {share}"
        )
    s1 = speed[("early exit", 1)] / speed[("full depth", 1)]
    sb = speed[("early exit", b)] / speed[("full depth", b)]
    print(f"\nearly-exit speedup: batch 1 {s1:.2f}x, batch {b} {sb:.2f}x")
    print(f"kept at batch {b}: {sb / s1:.0%} of the batch-1 speedup (goal >= 80%)")
    if s1 > 1:
        print(f"kept at batch {b}: {(sb - 1) / (s1 - 1):.0%} of the batch-1 gain over full depth")
    layers = model.config.num_layers
    print(
        f"layers skipped allow at most: batch 1 {layers / exits[('early exit', 1)][1]:.2f}x, "
        f"batch {b} {layers / exits[('early exit', b)][1]:.2f}x (a step runs as deep as its deepest row)"
    )
    for w in args.max_wait:
        drex = speed[(f"early exit, drex {w}", b)] / speed[("early exit", b)]
        print(f"DREX regrouping (a token waits up to {w} step(s)) / running at once, batch {b}: {drex:.2f}x tokens/s")


if __name__ == "__main__":
    main()
