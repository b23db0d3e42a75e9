"""Overlapped gradient reduction and parameter gathering (megatron-core DDP) against the
same layout without them: DP=2 here (2 processes), PP=2 x DP=2 in cases_overlap_pipeline."""

import os

from megatron.early_exit.pipeline.interleaved import model_chunks
from megatron.early_exit.sharding import full_state_dict
from megatron.early_exit.training.arguments import parse_run_config
from megatron.early_exit.training.trainer import pretrain
from tests.helpers import max_abs_diff
from tests.training_fixtures import tiny_run_flags

DATA = os.environ.get("EE_TEST_DATA")
OVERLAP = {"--overlap-grad-reduce": None, "--overlap-param-gather": None}


def _run(flags):
    state = pretrain(parse_run_config(tiny_run_flags(DATA, iters=5, **{"--use-distributed-optimizer": None}, **flags)))
    model = state.model
    chunks = model_chunks(model)  # one DDP per model chunk with the interleaved pipeline
    overlapped = model.ddp_config.overlap_grad_reduce
    assert all(c.ddp_config.overlap_grad_reduce == overlapped for c in chunks)
    if model.ddp_config.overlap_param_gather:  # every chunk waits for its gathered parameters in forward
        assert all(c.ddp_config.overlap_param_gather and c.remove_forward_pre_hook_handles for c in chunks)
    if overlapped:  # the backward hooks reported every bucket ready, so reduction started in backward
        assert all(
            g.golden_per_param_grad_ready_counts and not g.is_first_batch for c in chunks for g in c.bucket_groups
        )
    params = {}
    for c, chunk in enumerate(chunks):
        params.update({f"chunk{c}.{k}": v for k, v in full_state_dict(chunk.module).items()})
    return state.history, params, len(chunks)


def _compare(extra):
    ref_history, ref_params, chunks = _run(extra)
    results = {}
    for name, flags in (("grad_reduce", {"--overlap-grad-reduce": None}), ("both", OVERLAP)):
        history, params, _ = _run({**extra, **flags})
        assert len(history) == len(ref_history) == 5
        loss_diff = max(abs(g[k] - e[k]) for g, e in zip(history, ref_history) for k in e if "loss" in k)
        results[name] = {"loss_diff": loss_diff, "param_diff": max_abs_diff(params, ref_params)}
    results["history"], results["chunks"] = ref_history, chunks
    return results


def case_dp2():  # 2 processes
    return _compare({})
