"""Training runs under two processes; the pytest side compares them with one-process runs."""

import os

from megatron.early_exit.training.arguments import parse_run_config
from megatron.early_exit.training.trainer import pretrain
from tests.training_fixtures import tiny_run_flags

DATA = os.environ.get("EE_TEST_DATA")


def _history(argv):
    state = pretrain(parse_run_config(argv))
    return {"history": state.history, "validation": state.validation}


def case_dp2():
    return _history(tiny_run_flags(DATA, iters=6))


def case_dp2_distributed_optimizer():
    return _history(tiny_run_flags(DATA, iters=6, **{"--use-distributed-optimizer": None}))


def case_tp2():
    return _history(tiny_run_flags(DATA, iters=6, **{"--tensor-model-parallel-size": 2}))


def case_tp2_sequence_parallel():
    return _history(tiny_run_flags(DATA, iters=6, **{"--tensor-model-parallel-size": 2, "--sequence-parallel": None}))


# As on GPU, where megatron-core's gloo groups are not created: the optimizer must not
# ask for them (it asserted "Intra partial data parallel group is not initialized").
def case_dp2_no_gloo_groups():
    return _history(tiny_run_flags(DATA, iters=6, **{"--disable-gloo-process-groups": None}))


def case_dp2_distributed_optimizer_no_gloo_groups():
    return _history(
        tiny_run_flags(DATA, iters=6, **{"--use-distributed-optimizer": None, "--disable-gloo-process-groups": None})
    )
