"""Cost of exit heads in training: forward+backward time with exits vs the same backbone without.

    python benchmarks/exit_overhead.py [--iters 10] [--num-layers 8] ...

Both models are measured in the same run, interleaved, and the time ratio is put
beside the FLOP ratio of the added heads: time ratio / FLOP ratio near 1.0 means the
exits cost what their math costs and nothing more.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--ffn-hidden-size", type=int, default=704)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--exit-layer-nums", type=int, nargs="+", default=[2, 4])
    p.add_argument("--use-exit-norm", action="store_true", default=True)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args()


def main():
    args = parse_args()
    import torch
    import torch.nn.functional as F

    import megatron.early_exit  # noqa: F401

    # isort: split
    from megatron.core.transformer import TransformerConfig

    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.flops import backbone_flops, exit_heads_flops
    from megatron.early_exit.loss import early_exit_loss
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
    from megatron.early_exit.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=1)
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
    )
    variants = {
        "no exits": EarlyExitConfig(),
        f"exits {args.exit_layer_nums}": EarlyExitConfig(
            exit_layer_nums=args.exit_layer_nums, use_exit_norm=args.use_exit_norm
        ),
    }
    models = {name: EarlyExitGPTModel(config, ee, args.vocab_size, args.seq_length) for name, ee in variants.items()}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(args.seq_length).unsqueeze(0).expand(args.micro_batch_size, -1)
    loss_mask = torch.ones_like(labels, dtype=torch.float)

    def step(name):
        model = models[name]
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = model(inputs, position_ids, None, labels=labels)
        loss, _ = early_exit_loss(out, loss_mask, variants[name], iteration=0)
        loss.backward()
        return time.perf_counter() - start

    times = {name: [] for name in models}
    total = args.warmup + args.iters
    for i in range(total):
        for name in models:  # interleaved, so that machine noise hits both alike
            t = step(name)
            if i >= args.warmup:
                times[name].append(t)
        print(f"\r  iteration {i + 1}/{total}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    n_tokens = args.micro_batch_size * args.seq_length
    base_flops = backbone_flops(config, n_tokens, args.seq_length, args.vocab_size)
    base_name, exit_name = list(models)
    exit_flops = exit_heads_flops(config, variants[exit_name], n_tokens, args.seq_length, args.vocab_size)
    flop_ratio = (base_flops + exit_flops) / base_flops
    med = {name: statistics.median(ts) for name, ts in times.items()}
    time_ratio = med[exit_name] / med[base_name]

    print(
        f"model: {args.num_layers} layers, hidden {args.hidden_size}, vocab {args.vocab_size}, "
        f"micro-batch {args.micro_batch_size} x seq {args.seq_length}, {torch.get_num_threads()} threads"
    )
    print(f"{'variant':<16} {'fwd+bwd median (s)':>20} {'min (s)':>10} {'fwd GFLOP':>10} {'tokens/s':>10}")
    for name, ts in times.items():
        flops = base_flops + (exit_flops if name == exit_name else 0)
        print(f"{name:<16} {med[name]:>20.4f} {min(ts):>10.4f} {flops / 1e9:>10.2f} {n_tokens / med[name]:>10.0f}")
    print(f"time ratio (exits / no exits): {time_ratio:.3f}")
    print(f"FLOP ratio (exits / no exits): {flop_ratio:.3f}")
    print(f"time ratio / FLOP ratio: {time_ratio / flop_ratio:.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
