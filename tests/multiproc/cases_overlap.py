"""Overlapped gradient reduction and parameter gathering (megatron-core DDP) against the
same layout without them: DP=2 here (2 processes), PP=2 x DP=2 in cases_overlap_pipeline."""

import os

from megatron.early_exit.sharding import full_state_dict
from megatron.early_exit.training.arguments import parse_args
from megatron.early_exit.training.trainer import pretrain
from tests.helpers import max_abs_diff
from tests.training_fixtures import tiny_run_flags

DATA = os.environ.get("EE_TEST_DATA")
OVERLAP = {"--overlap-grad-reduce": None, "--overlap-param-gather": None}


def _run(flags):
    state = pretrain(parse_args(tiny_run_flags(DATA, iters=5, **{"--use-distributed-optimizer": None}, **flags)))
    model = state.model
    overlapped = model.ddp_config.overlap_grad_reduce
    if overlapped:  # the backward hooks reported every bucket ready, so reduction started in backward
        assert all(g.golden_per_param_grad_ready_counts and not g.is_first_batch for g in model.bucket_groups)
    return state.history, full_state_dict(model.module)


def _compare(extra):
    ref_history, ref_params = _run(extra)
    results = {}
    for name, flags in (("grad_reduce", {"--overlap-grad-reduce": None}), ("both", OVERLAP)):
        history, params = _run({**extra, **flags})
        assert len(history) == len(ref_history) == 5
        loss_diff = max(abs(g[k] - e[k]) for g, e in zip(history, ref_history) for k in e if "loss" in k)
        results[name] = {"loss_diff": loss_diff, "param_diff": max_abs_diff(params, ref_params)}
    results["history"] = ref_history
    return results


def case_dp2():  # 2 processes
    return _compare({})
