"""Convert a legacy Megatron-LM or EE-LLM checkpoint (any TP and PP) into ours.

    python tools/checkpoint/convert_megatron.py --load /ckpt/ee-llm-7b --save ckpt/ee-llm-7b
    python tools/checkpoint/convert_megatron.py --load /ckpt/gpt-345m/release --save ckpt/gpt-345m \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt

Reads DIR/latest_checkpointed_iteration.txt (or --iteration, or an iter_*/release directory
given as --load) and every mp_rank_TT[_PPP]/model_optim_rng.pt under it: the model weights,
EE-LLM's exit heads (norm, MLP, block; tied or untied output layers) and the stored args,
which become the model description. The files are unpickled without running code: only
tensors, containers, argparse.Namespace and the few classes these files hold load; anything
else is refused by name. Optimizer and RNG states are not converted (train on with
--finetune). Output is written to a temporary directory and renamed when complete.
See docs/legacy_checkpoints.md.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--load", required=True, help="Megatron-LM checkpoint directory (or one iter_*/release directory in it)"
    )
    p.add_argument("--save", required=True, help="output checkpoint directory (must not exist, or be empty)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to read (default: the latest)")
    p.add_argument(
        "--target-dtype", default="auto", help="auto (the run's: --bf16/--fp16 in its args), fp32, bf16 or fp16"
    )
    g = p.add_argument_group("tokenizer (default: the one in the checkpoint's args)")
    g.add_argument("--tokenizer-type", default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    p.add_argument("--no-progress", action="store_true", help="no per-stage progress lines")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from megatron.early_exit.errors import install_excepthook

    install_excepthook()
    from megatron.early_exit.legacy import convert_legacy
    from megatron.early_exit.models.model_config import TokenizerConfig
    from megatron.early_exit.parallel import initialize_parallel

    initialize_parallel(1, 1)
    start = time.time()
    tokenizer = TokenizerConfig(
        args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size
    )
    result = convert_legacy(
        args.load, args.save, args.iteration, args.target_dtype, tokenizer, progress=not args.no_progress
    )
    c = result.config
    exits = f"exits at layers {c.exit_layer_nums}" if c.exit_layer_nums else "no exits"
    print(
        f"converted {args.load} (iteration {result.iteration}, TP={result.source_layout[0]} "
        f"PP={result.source_layout[1]}) "
        f"-> {result.path} in {time.time() - start:.1f}s: {c.num_layers} layers, hidden {c.hidden_size}, "
        f"{c.num_attention_heads} heads, vocab {c.padded_vocab_size}, {exits}, {c.params_dtype}"
    )
    print("model flags for pretrain_early_exit_gpt.py (with --load " + result.path + " --finetune):")
    print("  " + " ".join(result.model_flags))


if __name__ == "__main__":  # dist_checkpointing's save re-imports __main__ in a helper process
    main()
