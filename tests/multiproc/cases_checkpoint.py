"""Save and resume under two processes: the resumed run repeats the straight run exactly."""

import os
import shutil
import tempfile

import torch

from megatron.early_exit.training.arguments import parse_run_config
from megatron.early_exit.training.trainer import pretrain
from tests.training_fixtures import tiny_run_flags

DATA = os.environ.get("EE_TEST_DATA")


def resume_matches_straight(layout):
    """20 iterations straight vs 10 + save + resume for 10: identical losses (bitwise)."""
    base = {"--hidden-dropout": 0.1, "--eval-iters": 0, **layout}
    straight = pretrain(parse_run_config(tiny_run_flags(DATA, iters=20, **base)))
    root = tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None
    holder = [root]
    torch.distributed.broadcast_object_list(holder)
    root = holder[0]
    first = pretrain(
        parse_run_config(tiny_run_flags(DATA, iters=10, **base, **{"--save": root, "--lr-decay-iters": 20}))
    )
    second = pretrain(parse_run_config(tiny_run_flags(DATA, iters=20, **base, **{"--load": root})))
    losses = lambda h: [e[k] for e in h for k in sorted(e) if "loss" in k]  # noqa: E731
    assert len(second.history) == 10
    assert losses(first.history + second.history) == losses(straight.history)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(root)
    return {"iterations": len(straight.history)}


def case_resume_tp2():
    return resume_matches_straight({"--tensor-model-parallel-size": 2, "--sequence-parallel": None})


def case_resume_pp2():
    return resume_matches_straight({"--pipeline-model-parallel-size": 2, "--num-layers": 4, "--exit-layer-nums": "1 3"})


def case_resume_dp2():
    return resume_matches_straight({})


def case_resume_dp2_distributed_optimizer():
    return resume_matches_straight({"--use-distributed-optimizer": None})


def case_distributed_optimizer_state_gathered_on_one_rank():
    """Host memory of the distributed optimizer's reshardable save, per DP rank (DP=2): with
    gloo groups (megatron-core's memory-efficient exchange) only DP rank 0 holds the gathered
    state; the NCCL-style exchange puts all of it on every rank."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron.early_exit.checkpoint.reader import model_sharded_state
    from megatron.early_exit.parallel import initialize_parallel
    from megatron.early_exit.training import checkpointing
    from megatron.early_exit.training.trainer import build_model, build_optimizer, model_vocab_size, wrap_model

    config = parse_run_config(tiny_run_flags(DATA, iters=4, **{"--use-distributed-optimizer": None}))
    ctx = initialize_parallel(1, 1, gloo_process_groups=True)
    vocab_size = model_vocab_size(config, config.model.tokenizer.vocab_size)
    model = wrap_model(build_model(config, ctx.device, vocab_size), config)
    optimizer, _ = build_optimizer(model, config, ctx.gloo_process_groups)
    checkpointing._materialise_optimizer_state(optimizer)
    metadata = checkpointing.optimizer_metadata(optimizer)
    assert metadata["distrib_optim_fully_reshardable_mem_efficient"]

    def held(metadata):
        state = optimizer.sharded_state_dict(model_sharded_state(model), metadata=metadata)["param_state"]
        return sum(
            t.data.numel() * t.data.element_size()
            for t in nested_values(state or {})
            if isinstance(t, (ShardedTensor, ShardedTensorFactory))
        )

    full = 3 * 4 * sum(p.numel() for p in model.parameters())  # fp32 main parameter and Adam's two moments
    efficient, everywhere = held(metadata), held({**metadata, "distrib_optim_fully_reshardable_mem_efficient": False})
    rank = torch.distributed.get_rank()
    assert everywhere == full and efficient == (full if rank == 0 else 0), (rank, efficient, everywhere, full)
    return {"bytes held on this rank": efficient, "without gloo groups": everywhere}
