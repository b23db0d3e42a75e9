"""Save and resume under two processes: the resumed run repeats the straight run exactly."""

import os
import shutil
import tempfile

import torch

from megatron.early_exit.training.arguments import parse_args
from megatron.early_exit.training.trainer import pretrain
from tests.training_fixtures import tiny_run_flags

DATA = os.environ.get("EE_TEST_DATA")


def resume_matches_straight(layout):
    """20 iterations straight vs 10 + save + resume for 10: identical losses (bitwise)."""
    base = {"--hidden-dropout": 0.1, "--eval-iters": 0, **layout}
    straight = pretrain(parse_args(tiny_run_flags(DATA, iters=20, **base)))
    root = tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None
    holder = [root]
    torch.distributed.broadcast_object_list(holder)
    root = holder[0]
    first = pretrain(parse_args(tiny_run_flags(DATA, iters=10, **base, **{"--save": root, "--lr-decay-iters": 20})))
    second = pretrain(parse_args(tiny_run_flags(DATA, iters=20, **base, **{"--load": root})))
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
