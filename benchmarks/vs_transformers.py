"""Our decoding against transformers' `generate` on the same weights, same machine, same run.

    python benchmarks/vs_transformers.py                   # a random Llama (8 layers, hidden 512, vocab 8192)
    python benchmarks/vs_transformers.py --load runs/quickstart/checkpoints --threshold 0.8

Without --load, a random LlamaForCausalLM is saved and converted with
tools/checkpoint/convert_hf.py's importer; with --load, our checkpoint is exported to
Hugging Face format (backbone only: transformers has no exits) and early exit at
--threshold is timed too. Prompts are random token ids; decoding is greedy with a fixed
number of new tokens (no stop token), so both sides produce the same count. Each row is
the best of --repeats timings (which filters a busy machine's noise), at batch 1 and 8,
with one thread and with every core. Tokens must be identical at full depth.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default=None, help="our checkpoint (default: a random Llama, converted)")
    p.add_argument("--threshold", type=float, default=0.8, help="early exit threshold (with --load)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 and every core")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when present): both models run there")
    return p.parse_args()


def random_llama(directory: str, args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=args.prompt_tokens + args.new_tokens + 16,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)


def best_of(repeats: int, fn):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main():
    args = parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from megatron.early_exit.errors import install_excepthook

    install_excepthook()
    from megatron.early_exit.hf.convert import export_hf, import_hf
    from megatron.early_exit.inference import EarlyExit, FullDepth, generate
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    work = args.work_dir or tempfile.mkdtemp(prefix="vs_transformers_")
    hf_dir, ours = os.path.join(work, "hf"), args.load or os.path.join(work, "ours")
    if args.load:
        print(f"exporting {args.load} to {hf_dir} ...", flush=True)
        export_hf(args.load, hf_dir)
    else:
        print(
            f"random Llama ({args.layers} layers, hidden {args.hidden}, vocab {args.vocab}) in {hf_dir}, converting "
            "...",
            flush=True,
        )
        random_llama(hf_dir, args)
        import_hf(hf_dir, ours)
    device = initialize_parallel(1, 1, device=args.device).device
    model, _, config = load_model(ours)  # on the process's device: megatron-core allocates there
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    vocab = min(config.padded_vocab_size, hf.config.vocab_size)
    strategies = [("full depth", FullDepth())]
    if args.load and config.early_exit.exit_layer_nums:
        strategies.append((f"early exit {args.threshold}", EarlyExit(args.threshold)))
    threads = args.threads or (sorted({1, os.cpu_count() or 1}) if device.type == "cpu" else [torch.get_num_threads()])
    print(f"\n{args.prompt_tokens}-token prompts, {args.new_tokens} greedy tokens, best of {args.repeats}\n")
    print(
        f"{'threads':>7} {'batch':>5} {'transformers tok/s':>19} "
        + " ".join(f"{name + ' tok/s':>22} {'ratio':>6}" for name, _ in strategies)
        + f" {'tokens equal':>13}"
    )
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for b in args.batch_sizes:
            g = torch.Generator().manual_seed(b)
            prompts = torch.randint(0, vocab, (b, args.prompt_tokens), generator=g).to(device)
            with torch.no_grad():
                t_hf, hf_out = best_of(
                    args.repeats,
                    lambda: hf.generate(
                        prompts,
                        attention_mask=torch.ones_like(prompts),
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                        use_cache=True,
                    ),
                )
            hf_tokens = hf_out[:, args.prompt_tokens :].tolist()
            row = f"{n_threads:>7} {b:>5} {b * args.new_tokens / t_hf:>19.1f} "
            equal = None
            for name, strategy in strategies:
                t, result = best_of(args.repeats, lambda: generate(model, prompts.tolist(), strategy, args.new_tokens))
                row += f"{b * args.new_tokens / t:>22.1f} {t_hf / t:>5.2f}x "
                if equal is None:
                    equal = result.tokens == hf_tokens
            print(row + f"{str(equal):>13}", flush=True)


if __name__ == "__main__":
    main()
