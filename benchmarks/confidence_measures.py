"""Which confidence measure singles out the tokens an exit gets right: per exit, the share of
tokens it could let leave while those agree with the final layer at a given precision.

    python benchmarks/confidence_measures.py                    # the shipped model, benchmarks/model
    python benchmarks/confidence_measures.py --load CKPT --prompts 120

The tokens are those decoding sees: the full-depth greedy continuations of held-out prompts
(standard-library modules the training corpus left out). Every exit is scored on every token,
alone (not as a cascade). The measures: the top-1 probability (`max_prob`), top-1 minus top-2
(`margin`), one minus the normalised entropy (`entropy`), and the learned classifier
(`learned`, CALM) fit on the first prompts' tokens and scored on the others (`--fit-fraction`),
once on the hidden state with the three distribution features and once on the hidden state
alone (what the hidden-state gate of `gated_max_prob` sees). The rule-based measures are scored
on the same held-out tokens.

Agreement with full depth is stricter than consistency: a continuation differs from its first
wrong token on, so agreement 0.95 over N new tokens allows only a per-token error rate e with
(1 - (1 - e)^N) / (N e) >= 0.95 (about 0.1% at N = 96). The script prints that rate; the
column at precision 1 - e is what an exit can let leave under it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.benchmark_inputs import converted_hf, held_out_prompts, log, prepare_corpus  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default=None, help="checkpoint directory (default: benchmarks/model, converted once)")
    p.add_argument("--hf", default=os.path.join(ROOT, "benchmarks", "model"))
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "inference_speed"))
    p.add_argument("--prompts", type=int, default=120)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--fit-fraction", type=float, default=0.6, help="prompts whose tokens fit the learned measure")
    p.add_argument("--precisions", type=float, nargs="+", default=[0.999, 0.99, 0.97, 0.95, 0.9])
    return p.parse_args()


def agreement_error_budget(num_tokens: int, agreement: float = 0.95) -> float:
    """The per-token error rate e at which the expected share of a continuation of `num_tokens`
    before its first wrong token, (1 - (1 - e)^N) / (N e), is `agreement` (bisection)."""
    low, high = 1e-9, 1.0
    for _ in range(100):
        e = (low + high) / 2
        if (1 - (1 - e) ** num_tokens) / (num_tokens * e) >= agreement:
            low = e
        else:
            high = e
    return low


def coverage_at_precision(score, agree, precision: float) -> float:
    """Share of tokens among the most confident whose agreement rate is still >= `precision`."""
    import torch

    order = torch.argsort(score, descending=True)
    rate = torch.cumsum(agree[order], 0) / torch.arange(1, len(order) + 1)
    reached = (rate >= precision).nonzero()
    return (int(reached[-1]) + 1) / len(agree) if len(reached) else 0.0


def main():
    args = parse_args()
    import torch

    import megatron.early_exit  # noqa: F401  (platform adapter)

    # isort: split
    from megatron.early_exit.confidence_training import collect, fit
    from megatron.early_exit.inference import FullDepth, generate
    from megatron.early_exit.inference.learned_confidence import NUM_LOGIT_FEATURES
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    os.makedirs(args.work_dir, exist_ok=True)
    files = prepare_corpus(args.work_dir)
    ckpt = args.load or converted_hf(args.hf, args.work_dir)
    initialize_parallel(1, 1)
    model, tokenizer, config = load_model(ckpt)
    prompts = held_out_prompts(tokenizer, files["jsonl"], args.prompts, args.prompt_tokens)
    start, sequences = time.perf_counter(), []
    for i in range(0, len(prompts), 8):
        batch = prompts[i : i + 8]
        tokens = generate(model, batch, FullDepth(), args.new_tokens).tokens
        sequences += [list(p) + t for p, t in zip(batch, tokens)]
        log(f"  decoded {len(sequences)}/{len(prompts)} prompts ({time.perf_counter() - start:.0f} s)")
    samples = collect(model, sequences, use_logits=True)
    # Only the positions decoding tests: from the prompt's last token on.
    keep = torch.cat([torch.arange(len(s)) >= args.prompt_tokens - 1 for s in sequences])
    fit_count = int(keep[: sum(len(s) for s in sequences[: int(len(sequences) * args.fit_fraction)])].sum())
    h = config.hidden_size
    print(
        f"\n{config.num_layers} layers, {len(prompts)} held-out prompts, {args.new_tokens} full-depth tokens each; "
        f"learned measures fit on {fit_count} tokens, every measure scored on the other "
        f"{int(keep.sum()) - fit_count}; share of tokens an exit lets leave at precision "
        + " / ".join(f"{p:g}" for p in args.precisions)
    )
    for n, s in sorted(samples.items()):
        features, agree = s.features[keep], s.agree[keep]
        fit_part, test_part = slice(0, fit_count), slice(fit_count, None)
        scores = {
            "max_prob": features[test_part, h],
            "margin": features[test_part, h + 1],
            "entropy": features[test_part, h + 2],
        }
        for name, width in (("learned", h + NUM_LOGIT_FEATURES), ("learned (hidden only)", h)):
            estimator = fit({n: type(s)(features[fit_part, :width], agree[fit_part])}, h)
            with torch.no_grad():
                scores[name] = estimator.heads[str(n)](features[test_part, :width]).squeeze(-1)
        print(f"exit {n}: agreement with the final layer {float(agree[test_part].mean()):.3f}")
        for name, score in scores.items():
            covered = [coverage_at_precision(score, agree[test_part], p) for p in args.precisions]
            print(f"  {name:<22}" + "".join(f"{c:>8.0%}" for c in covered))
    budget = agreement_error_budget(args.new_tokens)
    print(
        f"agreement >= 0.95 over {args.new_tokens}-token continuations allows {budget:.2%} of tokens wrong "
        f"(a continuation differs from its first wrong token on): exits may let leave only tokens they get "
        f"right at precision >= {1 - budget:.4f}, the first column's neighbourhood"
    )


if __name__ == "__main__":
    main()
