"""Our self-speculative decoding against transformers' LayerSkip-style assisted generation
(`generate(..., assistant_early_exit=E)`) on the same exported weights, in one run.

    python benchmarks/vs_assisted_generation.py --hf runs/benchmark_model/hf --exit-layer 2 --num-draft 4

The model is a Hugging Face export of ours (benchmarks/train_benchmark_model.py --export, or
tools/checkpoint/convert_hf.py --direction to-hf); it is converted back once into
--work-dir for our side. transformers drafts with the first E layers, its own final norm and
LM head (it does not know our exit heads); we draft with exit E's head. Both verify with the
full model, so both must reproduce greedy full-depth decoding: the script checks that every
token of both equals full depth on both sides. Greedy, batch 1, --threads torch threads,
prompts from standard-library sources, a fixed number of new tokens (no stop token), each
figure the best of --repeats timings.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="a Hugging Face export of one of our models")
    p.add_argument("--exit-layer", type=int, default=2)
    p.add_argument("--num-draft", type=int, default=4, help="our num_draft and transformers' num_assistant_tokens")
    p.add_argument(
        "--draft-threshold",
        type=float,
        default=0.0,
        help="both sides stop drafting after a draft whose probability under the drafting layers is below it "
        "(our draft_threshold, transformers' assistant_confidence_threshold; 0: never)",
    )
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "vs_assisted_generation"))
    return p.parse_args()


def stdlib_prompts(tokenizer, n: int, length: int):
    root = sysconfig.get_paths()["stdlib"]
    prompts = []
    for name in (
        "argparse.py",
        "json/decoder.py",
        "dataclasses.py",
        "functools.py",
        "pathlib.py",
        "typing.py",
        "textwrap.py",
        "shutil.py",
    ):
        text = open(os.path.join(root, name), encoding="utf-8").read()
        ids = tokenizer.tokenize(text[len(text) // 2 :][:4000])
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == n:
            break
    return prompts


def best_of(repeats: int, fn):
    out, best = None, float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def main():
    args = parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    import megatron.early_exit  # noqa: F401  (platform adapter)

    # isort: split
    from benchmarks.benchmark_inputs import converted_hf
    from megatron.early_exit.inference import FullDepth, SelfSpeculative, generate
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    ckpt = converted_hf(args.hf, args.work_dir)
    torch.set_num_threads(args.threads)
    initialize_parallel(1, 1, device="cpu")
    ours, tokenizer, config = load_model(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    prompts = stdlib_prompts(tokenizer, args.num_prompts, args.prompt_tokens)
    n = args.new_tokens

    def hf(prompt, **kw):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = theirs.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=theirs.config.pad_token_id,
                **kw,
            )
        return out[0, len(prompt) :].tolist()

    runs = {
        "ours full depth": lambda p: generate(ours, [p], FullDepth(), n).tokens[0],
        f"ours self-speculative [{args.exit_layer}x{args.num_draft}>{args.draft_threshold:g}]": lambda p: generate(
            ours, [p], SelfSpeculative(args.exit_layer, args.num_draft, args.draft_threshold), n
        ).tokens[0],
        "transformers full depth": lambda p: hf(p),
        f"transformers assistant_early_exit={args.exit_layer}": lambda p: hf(
            p,
            assistant_early_exit=args.exit_layer,
            num_assistant_tokens=args.num_draft,
            num_assistant_tokens_schedule="constant",  # the same number of drafts a round on both sides
            assistant_confidence_threshold=args.draft_threshold,
        ),
    }
    for fn in runs.values():  # warm-up
        fn(prompts[0][:8])
    tokens, seconds = {}, {}
    for name, fn in runs.items():
        results = [best_of(args.repeats, lambda p=p: fn(p)) for p in prompts]
        tokens[name] = [r[0] for r in results]
        seconds[name] = sum(r[1] for r in results)
        print(f"  {name}: {len(prompts) * n / seconds[name]:.1f} tokens/s", flush=True)
    names = list(runs)
    reference = tokens[names[0]]
    print(
        f"\n{config.num_layers} layers, hidden {config.hidden_size}, exits {config.early_exit.exit_layer_nums}; "
        f"{len(prompts)} prompts x {n} new tokens, greedy, batch 1, {args.threads} thread(s)"
    )
    print(f"{'decoding':<44}{'tokens/s':>10}{'vs own full':>13}{'tokens = full depth':>21}")
    for i, name in enumerate(names):
        own_full = names[0] if name.startswith("ours") else names[2]
        print(
            f"{name:<44}{len(prompts) * n / seconds[name]:>10.1f}{seconds[own_full] / seconds[name]:>12.2f}x"
            f"{str(tokens[name] == reference):>21}"
        )
    ratio = seconds[names[3]] / seconds[names[1]]
    print(
        f"\nours against transformers' assisted generation, same weights: {ratio:.2f}x (goal >= 1.3x), tokens equal: "
        f"{tokens[names[1]] == tokens[names[3]]}"
    )


if __name__ == "__main__":
    main()
