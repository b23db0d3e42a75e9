"""The continuous-batching engine at TP=2: rank 0 adds, aborts and plans each step, both
ranks execute the plan; every sequence decodes as it does alone at TP=1, and both ranks'
engines emit the same tokens."""

import torch

from megatron.early_exit.parallel import initialize_parallel
from megatron.early_exit.sharding import full_state_dict
from tests.engine_fixtures import alone, build_model, check_mixed_run, mixed_requests, run_engine
from tests.helpers import load_full_state_dict


def _tp2_engine_vs_tp1_alone(requests, arrivals, aborts, max_batch, prefill_chunk, regroup="none", max_wait=1):
    """Each request decoded alone at TP=1, then all of them through one TP=2 engine on the same
    weights: (rank 0's finished sequences, steps, the references, the engine)."""
    initialize_parallel(1, 1, seed=3)
    ref_model = build_model()
    weights = full_state_dict(ref_model)
    refs = [alone(ref_model, *req) for req in requests]
    initialize_parallel(2, 1, seed=3)
    model = build_model()
    load_full_state_dict(model, weights)
    finished, steps, log, engine = run_engine(
        model, requests, arrivals, aborts, max_batch, prefill_chunk, regroup, max_wait
    )
    logs = [None, None]
    torch.distributed.all_gather_object(logs, log)
    assert logs[0] == logs[1], "the ranks' engines diverged"
    return finished, steps, refs, engine


def case_mixed_requests_staggered_with_abort():
    finished, steps, refs, _ = _tp2_engine_vs_tp1_alone(mixed_requests(), [0, 0, 0, 1, 2, 4, 9, 10], [(4, 3)], 3, 4)
    if torch.distributed.get_rank() == 0:
        check_mixed_run(finished, steps, refs, aborted=4, num_aborted_tokens=3)
    return {"steps": len(steps)}


def case_one_slot_long_prefill_chunks():
    # Every request through one slot in turn; prompts fed 2 tokens a step; request 1 aborted early.
    requests = mixed_requests()[:4]
    finished, steps, refs, _ = _tp2_engine_vs_tp1_alone(requests, [0, 1, 1, 3], [(1, 2)], 1, 2)
    if torch.distributed.get_rank() == 0:
        for i in (0, 2, 3):
            assert finished[i].result.tokens[0] == refs[i].tokens[0]
            assert finished[i].result.exit_layers[0] == refs[i].exit_layers[0]
        assert finished[1].result.tokens[0] == refs[1].tokens[0][:2]
    return {"steps": len(steps)}


def case_regrouping_drex():
    # Rows going on past an exit in a small group wait up to 2 steps (DREX); still as alone at TP=1.
    from megatron.early_exit.inference import EarlyExit, SamplingParams
    from tests.engine_fixtures import PROMPTS

    requests = [
        (p, EarlyExit(0.25, kv=kv), SamplingParams(), 10, (), 0)
        for p in PROMPTS[:3]
        for kv in ("recompute", "propagate")
    ]
    finished, _, refs, engine = _tp2_engine_vs_tp1_alone(
        requests, [0, 0, 0, 1, 2, 3], (), 4, 4, regroup="drex", max_wait=2
    )
    assert engine.num_parked > 0 and engine.longest_wait == 2
    if torch.distributed.get_rank() == 0:
        for i, ref in enumerate(refs):
            assert finished[i].result.tokens[0] == ref.tokens[0]
            assert finished[i].result.exit_layers[0] == ref.exit_layers[0]
    return {"parked": engine.num_parked}
