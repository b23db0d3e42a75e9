"""TP=2 decoding equals TP=1 decoding of the same weights, token for token.

Under TP the decoder holds each rank's K/V heads, gathers vocab-parallel logits before
every decision, and every rank takes the same exit decisions and samples the same
tokens from identical logits and generators.
"""

import torch

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.inference import EarlyExit, FullDepth, SamplingParams, SelfSpeculative, generate
from megatron.early_exit.parallel import initialize_parallel
from megatron.early_exit.sharding import full_state_dict
from tests.helpers import load_full_state_dict, tiny_transformer_config

PROMPTS = [[5, 17, 3], [40, 2, 77, 13, 8, 61, 9, 30], [11, 12, 13, 14, 15]]


def _build(num_query_groups, **exit_flags):
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel

    torch.manual_seed(0)
    config = tiny_transformer_config(num_layers=4, num_query_groups=num_query_groups, init_method_std=0.3)
    return EarlyExitGPTModel(
        config,
        EarlyExitConfig(exit_layer_nums=[1, 3], **exit_flags),
        vocab_size=96,
        max_sequence_length=64,
        share_embeddings_and_output_weights=False,
    ).eval()


def _tp2_vs_tp1(strategy, sampling=SamplingParams(), num_query_groups=2, max_new_tokens=16, **exit_flags):
    initialize_parallel(1, 1, seed=3)
    ref_model = _build(num_query_groups, **exit_flags)
    weights = full_state_dict(ref_model)
    ref = generate(ref_model, PROMPTS, strategy, max_new_tokens=max_new_tokens, sampling=sampling)

    initialize_parallel(2, 1, seed=3)
    model = _build(num_query_groups, **exit_flags)
    load_full_state_dict(model, weights)
    out = generate(model, PROMPTS, strategy, max_new_tokens=max_new_tokens, sampling=sampling)

    assert out.tokens == ref.tokens, (out.tokens, ref.tokens)
    assert out.exit_layers == ref.exit_layers, (out.exit_layers, ref.exit_layers)
    diff = max(abs(a - b) for r, o in zip(ref.logprobs, out.logprobs) for a, b in zip(r, o))
    assert diff < 1e-4, diff
    early = sum(d < 4 for row in out.exit_layers for d in row)
    return {"logprob_diff": diff, "early_tokens": early, "accepted": out.num_accepted, "drafted": out.num_drafted}


def case_full_depth():
    return _tp2_vs_tp1(FullDepth(), use_exit_norm=True)


def case_early_exit_recompute():
    metrics = _tp2_vs_tp1(EarlyExit(0.35, "max_prob", "recompute"), use_exit_norm=True)
    assert metrics["early_tokens"] > 0
    return metrics


def case_early_exit_propagate_saturation():
    metrics = _tp2_vs_tp1(EarlyExit(0.8, "saturation", "propagate"), use_exit_norm=True)
    assert metrics["early_tokens"] > 0
    return metrics


def case_early_exit_untied_mlp_exits_one_kv_group():
    # One K/V group on two ranks: megatron-core gathers the fused QKV and each rank keeps the group.
    metrics = _tp2_vs_tp1(
        EarlyExit(0.15, "margin", "recompute"),
        num_query_groups=1,
        use_exit_norm=True,
        use_exit_mlp=True,
        untie_exit_output_weights=True,
    )
    assert metrics["early_tokens"] > 0
    return metrics


def case_self_speculative():
    metrics = _tp2_vs_tp1(SelfSpeculative(1, 3), use_exit_norm=True)
    assert 0 < metrics["accepted"] < metrics["drafted"]
    return metrics


def case_sampled_early_exit():
    return _tp2_vs_tp1(
        EarlyExit(0.35), SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7), use_exit_norm=True
    )


def case_checkpoint_saved_at_tp1_decodes_at_tp2():
    import shutil
    import tempfile

    from megatron.early_exit.inference.loading import load_model
    from tests.inference_models import save_tiny_checkpoint

    initialize_parallel(1, 1, seed=3)
    root = [tempfile.mkdtemp(prefix="ee_inference_ckpt_") if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(root, src=0)
    saved = save_tiny_checkpoint(root[0]).eval()
    strategy = EarlyExit(0.3, "max_prob", "propagate")
    ref = generate(saved, PROMPTS, strategy, max_new_tokens=12)
    initialize_parallel(2, 1, seed=3)
    model, _, _ = load_model(root[0], tensor_model_parallel_size=2)
    out = generate(model, PROMPTS, strategy, max_new_tokens=12)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(root[0], ignore_errors=True)
    assert out.tokens == ref.tokens and out.exit_layers == ref.exit_layers
    return {"early_tokens": sum(d < 3 for row in out.exit_layers for d in row)}
