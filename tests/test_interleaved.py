"""The interleaved (virtual) pipeline: plan, checks, simulation, flags, and (multi-process)
equality with one process, training and checkpoints across layouts."""

from dataclasses import replace

import pytest

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.errors import ConfigError
from megatron.early_exit.pipeline.interleaved import (
    chunk_costs,
    forward_order,
    interleaved_plan,
    layer_place,
    num_model_chunks,
    tied_embedding_stages,
)
from megatron.early_exit.pipeline.plan import (
    _mark_replies,
    check_plan,
    check_rendezvous,
    executor_program,
    pipeline_plan,
    simulate,
)
from tests.conftest import launch_grouped
from tests.training_fixtures import tiny_run_flags

LAYOUTS = [(2, 2, 2), (2, 2, 4), (2, 4, 6), (4, 2, 4), (4, 2, 8), (4, 3, 8), (8, 2, 8), (8, 2, 16)]  # (p, v, m)


@pytest.mark.parametrize("p,v,m", LAYOUTS)
def test_plan_passes_the_checks_and_runs_every_microbatch_once_per_chunk(p, v, m):
    plan = interleaved_plan(p, m, v)
    check_plan(plan)  # link order and NCCL's rendezvous rule
    check_rendezvous([executor_program(s, actions) for s, actions in enumerate(plan)], one_lane=True)
    for s, actions in enumerate(plan):
        for kind in "FB":
            done = sorted((a.chunk, a.item[1]) for a in actions if a.kind == kind)
            assert done == sorted((c, j) for c in range(v) for j in range(m)), (s, kind)
        # The first virtual stage receives nothing, the last sends nothing forward.
        for a in actions:
            u = a.virtual_stage(s)
            assert a.recv == (u != 0 if a.kind == "F" else u != p * v - 1)
            assert a.send == (u != p * v - 1 if a.kind == "F" else u != 0)
    # Forward-only (evaluation) keeps the forwards in the same order.
    forwards = [[a for a in actions if a.kind == "F"] for actions in plan]
    check_rendezvous([executor_program(s, actions) for s, actions in enumerate(forwards)])


@pytest.mark.parametrize("p,v,m", LAYOUTS)
def test_simulation_respects_dependencies_and_gives_the_interleaved_bubble(p, v, m):
    plan = interleaved_plan(p, m, v)
    timeline = simulate(plan, chunk_costs([1.0] * p, v), chunk_costs([2.0] * p, v))
    end = {}
    for s, spans in enumerate(timeline.spans):
        for start, stop, a in spans:
            end[(a.kind, a.item, a.virtual_stage(s))] = (start, stop)
    for (kind, item, u), (start, _) in end.items():
        if kind == "F" and u > 0:
            assert start >= end[("F", item, u - 1)][1]
        if kind == "B":
            assert start >= end[("F", item, u)][1]
            if u < p * v - 1:
                assert start >= end[("B", item, u + 1)][1]
    # Uniform stages: the known bubble of interleaved 1F1B, (p-1) / (v*m + p-1), smaller than 1F1B's.
    assert timeline.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))
    plain = simulate(pipeline_plan(p, m), [1.0] * p, [2.0] * p).bubble_fraction
    assert plain == pytest.approx((p - 1) / (m + p - 1)) and timeline.bubble_fraction < plain


def test_forward_order_is_megatron_cores_schedule_table():
    from megatron.core.pipeline_parallel.schedules import get_schedule_table

    for p, v, m in LAYOUTS + [(2, 2, 5), (4, 2, 10)]:
        assert forward_order(m, v, p) == get_schedule_table(m, v, p)


def test_warmup_depth_and_reversed_chunks_in_backward():
    p, v, m = 4, 2, 8
    for s, actions in enumerate(interleaved_plan(p, m, v)):
        first_backward = next(i for i, a in enumerate(actions) if a.kind == "B")
        assert first_backward == 2 * (p - 1 - s) + (v - 1) * p + 1  # warm-up forwards, then the steady pair's forward
        assert actions[first_backward].chunk == v - 1  # the last chunk back-propagates first
        # Steady state: one forward and one backward posted together (with_previous).
        assert all(
            a.with_previous == (a.kind == "B" and actions[i - 1].kind == "F") for i, a in enumerate(actions) if i
        )


def test_pairs_posted_apart_would_deadlock():
    """Why a steady forward-backward pair posts as one batch: posting at every action
    boundary waits in a circle around the ring."""
    plan = interleaved_plan(2, 4, 2)
    apart = _mark_replies([[replace(a, with_previous=False, replies_first=()) for a in actions] for actions in plan])
    with pytest.raises(ValueError, match="deadlocks"):
        check_plan(apart)


def test_broken_interleaved_plans_are_refused():
    plan = interleaved_plan(2, 2, 2)
    swapped = [list(actions) for actions in plan]
    i = next(i for i, a in enumerate(swapped[1]) if a.kind == "B")
    swapped[1][i - 1], swapped[1][i] = swapped[1][i], swapped[1][i - 1]
    with pytest.raises(ValueError, match="backward of"):
        check_plan(swapped)
    reordered = [list(actions) for actions in plan]
    reordered[0][0], reordered[0][1] = reordered[0][1], reordered[0][0]  # stage 0 sends R1 before R0
    with pytest.raises(ValueError, match="forward link 0->1"):
        check_plan(reordered)


def test_layers_exits_and_embedding_copies_live_on_their_chunk():
    # 8 layers, 2 stages, 2 chunks: virtual stages of 2 layers; chunk c of stage s is c*2 + s.
    assert [layer_place(n, 8, 2, 2) for n in range(1, 9)] == [
        (0, 0),
        (0, 0),
        (1, 0),
        (1, 0),
        (0, 1),
        (0, 1),
        (1, 1),
        (1, 1),
    ]
    ee = EarlyExitConfig(exit_layer_nums=[2, 5])
    assert tied_embedding_stages(ee, 8, 2, 2, tied_output=False) == [0]  # both exits on stage 0's chunks
    # 4 stages x 2 chunks: one layer each; layer 2 on stage 1, layer 5 on stage 0 (chunk 1).
    assert tied_embedding_stages(ee, 8, 4, 2, tied_output=True) == [0, 1, 3]
    untied = EarlyExitConfig(exit_layer_nums=[2, 5], untie_exit_output_weights=True)
    assert tied_embedding_stages(untied, 8, 4, 2, tied_output=False) == [0]


def test_layout_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--num-layers-per-virtual-pipeline-stage"):
        num_model_chunks(8, 2, 3)
    with pytest.raises(ConfigError, match="one model chunk"):
        num_model_chunks(8, 2, 4)
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size"):
        num_model_chunks(8, 1, 2)
    with pytest.raises(ConfigError, match="multiple of --pipeline-model-parallel-size"):
        interleaved_plan(4, 6, 2)


def _args(**flags):
    from megatron.early_exit.training.arguments import parse_args

    base = {
        "--num-layers": 8,
        "--pipeline-model-parallel-size": 2,
        "--exit-layer-nums": "2 5",
        "--exit-layer-weight": "0.3 0.3",
        "--mock-data": None,
    }
    return parse_args(tiny_run_flags(None, iters=4, **{**base, **flags}), world_size=2)


def test_flags_give_the_chunks_and_refuse_what_does_not_apply():
    from megatron.early_exit.training.arguments import build_run_config

    assert build_run_config(_args(**{"--num-layers-per-virtual-pipeline-stage": 2})).virtual_pipeline_chunks == 2
    assert build_run_config(_args(**{"--num-virtual-stages-per-pipeline-rank": 4})).virtual_pipeline_chunks == 4
    assert build_run_config(_args()).virtual_pipeline_chunks == 1
    with pytest.raises(
        ConfigError, match="--fill-explicit-bubbles cannot be combined with --num-layers-per-virtual-pipeline-stage"
    ):
        _args(**{"--num-layers-per-virtual-pipeline-stage": 2, "--fill-explicit-bubbles": None})
    with pytest.raises(ConfigError, match="cannot be combined"):
        _args(**{"--num-layers-per-virtual-pipeline-stage": 2, "--num-virtual-stages-per-pipeline-rank": 2})
    with pytest.raises(ConfigError, match="--tune-exit cannot be combined"):
        _args(**{"--num-layers-per-virtual-pipeline-stage": 2, "--tune-exit": None})
    with pytest.raises(ConfigError, match="microbatches per step"):  # 8 / (2 x 1) = 4 ok; 6 / 2 = 3 is not
        _args(**{"--num-layers-per-virtual-pipeline-stage": 2, "--global-batch-size": 6})


def test_entry_point_prints_one_line_for_the_refusal():
    """The refusal reaches users as one line naming both flags (no traceback)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    argv = tiny_run_flags(
        None,
        iters=4,
        **{
            "--num-layers": 8,
            "--pipeline-model-parallel-size": 2,
            "--mock-data": None,
            "--num-layers-per-virtual-pipeline-stage": 2,
            "--fill-explicit-bubbles": None,
        },
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK")}
    env.update(WORLD_SIZE="2", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "pretrain_early_exit_gpt.py", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (
        "--fill-explicit-bubbles cannot be combined with --num-layers-per-virtual-pipeline-stage"
        in (proc.stderr.strip().splitlines()[-1])
    )


# -- multi-process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def interleaved_runs(request):
    return launch_grouped("tests.multiproc.cases_interleaved", request)


def _ok(result):
    assert result["ok"], result["error"]
    return result["metrics"]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize(
    "case",
    [
        "case_pp2_v2_tied_exits_on_first_middle_last_chunks",
        "case_pp2_v2_untied_exit_mlp_untied_model",
        "case_pp2_v2_tied_exits_untied_model_six_microbatches",
    ],
)
def test_pp2_v2_losses_and_gradients_equal_one_process(interleaved_runs, case):
    metrics = _ok(interleaved_runs[case])
    assert metrics["grad_diff"] < 1e-5


@pytest.mark.slow
@pytest.mark.multiproc
def test_pp2_v2_training_equals_one_process_and_its_checkpoint_loads_anywhere(dist1, corpus, interleaved_runs):
    from megatron.early_exit.training.arguments import parse_run_config
    from megatron.early_exit.training.trainer import pretrain

    got = _ok(interleaved_runs["case_train_pp2_v2_save_and_load_in_other_layouts"])
    flags = {"--num-layers": 8, "--exit-layer-nums": "2 5 7", "--exit-layer-weight": "0.3 0.3 0.3"}
    reference = pretrain(parse_run_config(tiny_run_flags(corpus, iters=3, **flags), world_size=1))
    for history, expected in ((got["history"], reference.history), (got["validation"], reference.validation)):
        assert len(history) == len(expected)
        for g, e in zip(history, expected):
            for key in [k for k in e if "loss" in k]:
                assert abs(g[key] - e[key]) <= 1e-5 * max(1.0, abs(e[key])), (key, g[key], e[key])
    assert set(got["history"][0]) >= {"lm loss", "early loss [2]", "early loss [5]", "early loss [7]"}
    # Logits of the trained chunks, of the checkpoint resumed with 4 chunks per stage, and of
    # inference loads at PP=2 and PP=1 (no virtual stages) agree.
    assert set(got["logit_diffs"]) == {"pp2 x v2 (trained)", "pp2 x v4 (resumed)", "pp2 inference"}
    assert max(got["logit_diffs"].values()) < 1e-5
