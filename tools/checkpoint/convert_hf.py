"""Convert between Hugging Face checkpoints of the Llama family (Llama 2/3, Mistral,
Qwen2/Qwen2.5, Qwen3) and ours, both ways, losslessly.

    # Hugging Face -> ours (config.json + safetensors, sharded or not, or pytorch_model.bin)
    python tools/checkpoint/convert_hf.py --load /models/Llama-2-7b-hf --save ckpt/llama2-7b \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 4 --target-dtype bf16

    # ours -> Hugging Face (transformers' *ForCausalLM loads the backbone; exit heads are saved
    # alongside in early_exit_heads.safetensors and config.json's early_exit section, which
    # megatron.early_exit.hf.modeling.EarlyExitForCausalLM runs)
    python tools/checkpoint/convert_hf.py --direction to-hf --load ckpt/llama2-7b-ee --save hf/llama2-7b-ee

Our checkpoint format is layout-independent: the target TP/PP sizes are recorded with the
model flags and any other layout loads it as well. Tokenizer files travel along. Output
is written to a temporary directory and renamed when complete. The model is held in
memory once, in the checkpoint's dtype (about 2 bytes per parameter for bf16).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--direction", choices=("from-hf", "to-hf"), default="from-hf")
    p.add_argument(
        "--load", required=True, help="from-hf: a Hugging Face model directory; to-hf: our checkpoint directory"
    )
    p.add_argument("--save", required=True, help="output directory (must not exist, or be empty)")
    p.add_argument(
        "--target-tensor-parallel-size", type=int, default=1, help="from-hf: TP recorded with the model flags"
    )
    p.add_argument(
        "--target-pipeline-parallel-size", type=int, default=1, help="from-hf: PP recorded with the model flags"
    )
    p.add_argument("--target-dtype", default="auto", help="from-hf: auto (config.json's dtype), fp32, bf16 or fp16")
    p.add_argument("--max-shard-size", default="5GB", help="to-hf: largest safetensors shard (e.g. 5GB, 500MB)")
    p.add_argument("--iteration", type=int, default=None, help="to-hf: checkpoint iteration (default: the latest)")
    p.add_argument(
        "--model-type",
        default="auto",
        help="to-hf: llama, mistral, qwen2 or qwen3; auto: the family the checkpoint was imported from, "
        "else qwen3 for --qk-layernorm, qwen2 for --add-qkv-bias, llama otherwise",
    )
    p.add_argument("--no-progress", action="store_true", help="no per-tensor progress bar")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from megatron.early_exit.errors import install_excepthook

    install_excepthook()
    from megatron.early_exit.hf.convert import export_hf, import_hf, parse_size
    from megatron.early_exit.hf.families import FAMILIES
    from megatron.early_exit.parallel import initialize_parallel

    initialize_parallel(1, 1)
    start = time.time()
    if args.direction == "from-hf":
        result = import_hf(
            args.load,
            args.save,
            args.target_tensor_parallel_size,
            args.target_pipeline_parallel_size,
            args.target_dtype,
            progress=not args.no_progress,
        )
        s = result.shape
        print(
            f"converted {args.load} ({FAMILIES[s.model_type].architecture}) -> {result.path} in "
            f"{time.time() - start:.1f}s: {s.num_layers} layers, hidden "
            f"{s.hidden_size}, {s.num_attention_heads} heads ({s.num_query_groups} KV groups), vocab {s.vocab_size}, "
            f"RoPE {s.rope_kind}, target TP={args.target_tensor_parallel_size} PP={args.target_pipeline_parallel_size}"
        )
        print("model flags for pretrain_early_exit_gpt.py (with --load " + result.path + " --finetune):")
        print("  " + " ".join(result.model_flags))
    else:
        path = export_hf(
            args.load,
            args.save,
            parse_size(args.max_shard_size),
            progress=not args.no_progress,
            iteration=args.iteration,
            model_type=args.model_type,
        )
        print(
            f"exported {args.load} -> {path} in {time.time() - start:.1f}s (transformers.AutoModelForCausalLM loads "
            "the backbone; megatron.early_exit.hf.modeling.EarlyExitForCausalLM loads it with its exits)"
        )


if __name__ == "__main__":  # dist_checkpointing's save re-imports __main__ in a helper process
    main()
