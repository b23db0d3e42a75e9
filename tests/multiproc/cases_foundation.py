"""Two-process checks of megatron-core on CPU through the platform adapter."""

import torch

from megatron.early_exit.parallel import initialize_parallel, set_seed
from megatron.early_exit.sharding import full_state_dict
from tests.helpers import (
    allreduce_sequence_parallel_grads,
    build_gpt,
    load_full_state_dict,
    make_batch,
    max_abs_diff,
    tiny_transformer_config,
)


def _loss_and_grads(model, batch):
    tokens, labels, pos = batch
    model.zero_grad()
    loss = model(tokens, pos, None, labels=labels).mean()
    loss.backward()
    allreduce_sequence_parallel_grads(model)
    return loss.detach(), full_state_dict(model, grads=True)


def _tp2_vs_tp1(sequence_parallel, tied=True):
    initialize_parallel(1, 1, seed=7)
    ref_model = build_gpt(tiny_transformer_config(), tied=tied)
    weights = full_state_dict(ref_model)
    batch = make_batch(seed=3)
    ref_loss, ref_grads = _loss_and_grads(ref_model, batch)

    initialize_parallel(2, 1, seed=7)
    model = build_gpt(tiny_transformer_config(sequence_parallel=sequence_parallel), tied=tied)
    load_full_state_dict(model, weights)
    loss, grads = _loss_and_grads(model, batch)
    loss_diff = float((loss - ref_loss).abs())
    grad_diff = max_abs_diff(grads, ref_grads)
    assert loss_diff < 1e-5, loss_diff
    assert grad_diff < 1e-5, grad_diff
    assert max(float(g.abs().max()) for g in grads.values()) > 0
    return {"loss_diff": loss_diff, "grad_diff": grad_diff}


def case_tp2_equals_tp1():
    return _tp2_vs_tp1(sequence_parallel=False)


def case_tp2_sequence_parallel_equals_tp1():
    return _tp2_vs_tp1(sequence_parallel=True)


def case_tp2_untied_equals_tp1():
    return _tp2_vs_tp1(sequence_parallel=False, tied=False)


def _ddp_step_vs_adamw(use_distributed_optimizer):
    """DP=2: megatron DDP + megatron optimizer take the step AdamW takes on the mean gradient."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    initialize_parallel(1, 1, seed=11)
    config = tiny_transformer_config()
    model = build_gpt(config)
    weights = full_state_dict(model)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    batches = [make_batch(seed=100 + r) for r in range(world)]
    hp = dict(lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)

    # Reference on one process: the mean of every rank's gradient, then torch AdamW.
    ref = build_gpt(config)
    load_full_state_dict(ref, weights)
    ref.zero_grad()
    for tokens, labels, pos in batches:
        (ref(tokens, pos, None, labels=labels).mean() / world).backward()
    # megatron-core's standard rule: no weight decay on 1-D parameters (norms, biases).
    groups = [
        {"params": [p for p in ref.parameters() if p.ndim > 1], "weight_decay": hp["weight_decay"]},
        {"params": [p for p in ref.parameters() if p.ndim == 1], "weight_decay": 0.0},
    ]
    ref_opt = torch.optim.AdamW(groups, lr=hp["lr"], betas=(hp["adam_beta1"], hp["adam_beta2"]), eps=hp["adam_eps"])
    ref_opt.step()
    expected = full_state_dict(ref)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer, bucket_size=1000
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", use_distributed_optimizer=use_distributed_optimizer, clip_grad=0.0, **hp),
        [ddp],
    )
    # The scheduler applies each group's wd_mult (0 for norms and biases), as in training.
    OptimizerParamScheduler(
        opt,
        init_lr=hp["lr"],
        max_lr=hp["lr"],
        min_lr=hp["lr"],
        lr_warmup_steps=0,
        lr_decay_steps=1,
        lr_decay_style="constant",
        start_wd=hp["weight_decay"],
        end_wd=hp["weight_decay"],
        wd_incr_steps=1,
        wd_incr_style="constant",
    )
    ddp.zero_grad_buffer()
    opt.zero_grad()
    tokens, labels, pos = batches[rank]
    ddp(tokens, pos, None, labels=labels).mean().backward()
    ddp.finish_grad_sync()
    ok, grad_norm, _ = opt.step()
    assert ok
    got = full_state_dict(model)
    diff = max_abs_diff(got, expected)
    moved = max_abs_diff(got, weights)
    assert moved > 1e-3, "the optimizer did not move the weights"
    assert diff < 1e-5, diff
    return {"param_diff": diff, "grad_norm": grad_norm}


def case_ddp_plain_optimizer_matches_adamw():
    return _ddp_step_vs_adamw(False)


def case_ddp_distributed_optimizer_matches_adamw():
    return _ddp_step_vs_adamw(True)


def case_tp2_dropout_reproducible():
    initialize_parallel(2, 1, seed=5)
    model = build_gpt(tiny_transformer_config(hidden_dropout=0.2, attention_dropout=0.2))
    tokens, labels, pos = make_batch(seed=1)

    def loss_with_seed(seed):
        set_seed(seed)
        return model(tokens, pos, None, labels=labels).mean().item()

    a, b, c = loss_with_seed(42), loss_with_seed(42), loss_with_seed(43)
    model.eval()
    no_dropout = model(tokens, pos, None, labels=labels).mean().item()
    assert a == b, (a, b)
    assert a != c and a != no_dropout
    # Both TP ranks agree (loss is computed over the full vocabulary on each).
    both = [None, None]
    torch.distributed.all_gather_object(both, a)
    assert both[0] == both[1], both
    return {"loss_seed42": a, "loss_seed43": c}
