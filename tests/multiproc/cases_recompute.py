"""Recomputation under TP=2 and PP=2 (2 processes): gradients equal the same layout without it."""

import os

import torch
from megatron.core import parallel_state

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
from megatron.early_exit.models.recompute import RecomputeConfig
from megatron.early_exit.parallel import initialize_parallel
from megatron.early_exit.sharding import full_state_dict
from megatron.early_exit.training.arguments import parse_run_config
from megatron.early_exit.training.trainer import pretrain
from tests.helpers import ee_loss_and_grads, load_full_state_dict, make_batch, max_abs_diff, tiny_transformer_config
from tests.training_fixtures import tiny_run_flags

DATA = os.environ.get("EE_TEST_DATA")
SETTINGS = [
    RecomputeConfig("selective"),
    RecomputeConfig("full", "uniform", 2, exit_heads=True),
    RecomputeConfig("full", "block", 1),
    RecomputeConfig(exit_heads=True),
]


def _tp2(sequence_parallel):
    ee_config = EarlyExitConfig(
        exit_layer_nums=[1, 3], exit_layer_weight=[0.5, 0.25], use_exit_mlp=True, untie_exit_output_weights=True
    )
    batch = make_batch(seed=9, batch=2, seq=16)
    initialize_parallel(2, 1, seed=3)
    weights, ref, diffs = None, None, [0.0, 0.0]
    for recompute in [RecomputeConfig()] + SETTINGS:
        config = tiny_transformer_config(
            num_query_groups=2, sequence_parallel=sequence_parallel, **recompute.transformer_config_kwargs()
        )
        model = EarlyExitGPTModel(
            config, ee_config, vocab_size=96, max_sequence_length=16, recompute_exit_heads=recompute.exit_heads
        )
        weights = weights or full_state_dict(model)
        load_full_state_dict(model, weights)
        loss, grads, _ = ee_loss_and_grads(model, ee_config, batch)
        if ref is None:
            ref = (loss, grads)
            continue
        diffs = [max(diffs[0], abs(loss.item() - ref[0].item())), max(diffs[1], max_abs_diff(grads, ref[1]))]
    return {"settings": len(SETTINGS), "max_loss_diff": diffs[0], "max_grad_diff": diffs[1]}


def case_tp2_gradients():
    return _tp2(False)


def case_tp2_sequence_parallel_gradients():
    return _tp2(True)


PP_FLAGS = {
    "--num-layers": 8,
    "--exit-layer-nums": "2 5 7",
    "--exit-layer-weight": "0.3 0.3 0.3",
    "--pipeline-model-parallel-size": 2,
    "--lr": 0.0,
    "--min-lr": 0.0,
    "--lr-warmup-iters": 0,
}
PP_SETTINGS = [
    {"--recompute-activations": None},
    {
        "--recompute-granularity": "full",
        "--recompute-method": "uniform",
        "--recompute-num-layers": 2,
        "--recompute-exit-heads": None,
    },
    {"--recompute-granularity": "full", "--recompute-method": "block", "--recompute-num-layers": 3},
]


def _pp2(extra):
    """Per-iteration losses and the last iteration's gradients of every stage (lr 0: each
    iteration sees the same weights) with each setting, against none."""

    def run(flags):
        state = pretrain(parse_run_config(tiny_run_flags(DATA, iters=2, **PP_FLAGS, **extra, **flags)))
        grads = full_state_dict(state.model.module, grads=True)
        return state.history, grads

    ref_history, ref_grads = run({})
    loss_diff = grad_diff = 0.0
    for flags in PP_SETTINGS:
        history, grads = run(flags)
        for got, want in zip(history, ref_history):
            loss_diff = max([loss_diff] + [abs(got[k] - want[k]) for k in want if "loss" in k])
        grad_diff = max(grad_diff, max_abs_diff(grads, ref_grads))
    assert any(float(g.abs().sum()) > 0 for g in ref_grads.values())
    diffs = torch.tensor([loss_diff, grad_diff])
    torch.distributed.all_reduce(diffs, op=torch.distributed.ReduceOp.MAX)
    assert parallel_state.get_pipeline_model_parallel_world_size() == 2
    return {"settings": len(PP_SETTINGS), "max_loss_diff": float(diffs[0]), "max_grad_diff": float(diffs[1])}


def case_pp2_gradients():
    return _pp2({})


def case_pp2_fill_gradients():
    return _pp2(
        {"--fill-explicit-bubbles": None, "--num-fill-warmup-microbatches": 1, "--num-fill-cooldown-microbatches": 1}
    )
