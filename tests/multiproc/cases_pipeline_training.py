"""Pipeline-parallel training runs (4 processes) through pretrain_early_exit_gpt's trainer."""

import os

import torch
from megatron.core import parallel_state

from megatron.early_exit.models.init import canonical_name
from megatron.early_exit.sharding import full_state_dict
from megatron.early_exit.training.arguments import parse_run_config
from megatron.early_exit.training.trainer import pretrain
from tests.training_fixtures import tiny_run_flags

DATA = os.environ.get("EE_TEST_DATA")
PP_FLAGS = {"--num-layers": 8, "--exit-layer-nums": "2 5 7", "--exit-layer-weight": "0.3 0.3 0.3"}


def _full_params(model):
    inner = model.module
    parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    mine = {canonical_name(inner, k): v for k, v in full_state_dict(inner).items()}
    torch.distributed.all_gather_object(parts, mine, group=parallel_state.get_pipeline_model_parallel_group())
    return parts


def case_pp2_dp2_history():
    state = pretrain(
        parse_run_config(tiny_run_flags(DATA, iters=4, **PP_FLAGS, **{"--pipeline-model-parallel-size": 2}))
    )
    return {"history": state.history, "validation": state.validation}


def case_pp4_tied_copies_stay_identical():
    state = pretrain(
        parse_run_config(tiny_run_flags(DATA, iters=3, **PP_FLAGS, **{"--pipeline-model-parallel-size": 4}))
    )
    parts = _full_params(state.model)
    # Stage 0 holds the embedding, stage 2 a copy for its tied exit (layer 5), stage 3 the
    # tied output layer (also used by its exit at layer 7).
    copies = [
        parts[0]["embedding.word_embeddings.weight"],
        parts[2]["exit_word_embeddings"],
        parts[3]["output_layer.weight"],
    ]
    assert all("exit_word_embeddings" not in parts[s] for s in (0, 1, 3))
    for copy in copies[1:]:
        assert torch.equal(copy, copies[0])
    return {"history": state.history}


def case_pp2_exit_tuning():
    flags = tiny_run_flags(
        DATA,
        iters=3,
        **PP_FLAGS,
        **{
            "--pipeline-model-parallel-size": 2,
            "--tune-exit": None,
            "--untie-exit-output-weights": None,
        },
    )
    state = pretrain(parse_run_config(flags))
    merged = {}
    for part in _full_params(state.model):
        merged.update(part)
    return {"params": {k: v.tolist() for k, v in merged.items()}}


def case_pp4_bubble_filling_trains():
    flags = tiny_run_flags(
        DATA,
        iters=3,
        **PP_FLAGS,
        **{
            "--pipeline-model-parallel-size": 4,
            "--fill-explicit-bubbles": None,
            "--global-batch-size": 16,
        },
    )
    state = pretrain(parse_run_config(flags))
    assert all(h["lm loss"] > 0 for h in state.history)
    return {"history": state.history}
