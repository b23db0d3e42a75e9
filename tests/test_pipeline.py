"""Pipeline plans (pure), and pipeline training runs against one-process runs."""

import dataclasses

import pytest
import torch

from megatron.early_exit.pipeline.plan import (
    Action,
    FillPlan,
    build_fill_plan,
    check_plan,
    default_num_fill_microbatches,
    exit_tuning_plan,
    pipeline_plan,
    simulate,
)
from tests.conftest import launch_grouped
from tests.training_fixtures import run_training, tiny_run_flags


def names(actions):
    return " ".join(str(a) for a in actions)


def test_one_f_one_b_reads_as_warmup_steady_cooldown():
    plan = pipeline_plan(4, 6)
    assert names(plan[0]) == "FR0 FR1 FR2 FR3 BR0 FR4 BR1 FR5 BR2 BR3 BR4 BR5"
    assert names(plan[3]) == "FR0 BR0 FR1 BR1 FR2 BR2 FR3 BR3 FR4 BR4 FR5 BR5"
    assert not plan[0][0].recv and plan[0][0].send and plan[3][0].recv and not plan[3][0].send
    assert not plan[0][-1].send and plan[3][-1].send
    check_plan(plan)


@pytest.mark.parametrize("p,m", [(1, 3), (2, 1), (2, 5), (4, 1), (4, 3), (4, 8), (8, 16)])
@pytest.mark.parametrize("fill", [None, "default"])
def test_plans_are_consistent_and_deadlock_free(p, m, fill):
    fp = None
    if fill:
        n = default_num_fill_microbatches(p, 2.0)
        fp = build_fill_plan(p, list(range(p)), n, n, 2.0)
    plan = pipeline_plan(p, m, fp)
    check_plan(plan)
    timeline = simulate(plan, [1.0] * p, [2.0] * p)
    for s, actions in enumerate(plan):  # every real microbatch once forward, once backward
        assert sorted(a.item for a in actions if a.kind == "F" and a.item[0] == "R") == [("R", j) for j in range(m)]
        assert sorted(a.item for a in actions if a.kind == "B" and a.item[0] == "R") == [("R", j) for j in range(m)]
    assert 0.0 <= timeline.bubble_fraction < 1.0


def test_check_plan_catches_mismatches():
    plan = pipeline_plan(2, 2)
    swapped = [plan[0], [plan[1][2], plan[1][3], plan[1][0], plan[1][1]]]
    with pytest.raises(ValueError, match="forward link 0->1"):
        check_plan(swapped)
    with pytest.raises(ValueError, match="backward of"):
        check_plan([[Action("B", ("R", 0), False, False)]])
    with pytest.raises(ValueError, match="deadlocks"):
        simulate([[Action("F", ("R", 0), recv=True, send=False)]], [1.0], [1.0])


def test_simulated_1f1b_bubble_matches_formula():
    for p, m in [(2, 4), (4, 8), (4, 16)]:
        t = simulate(pipeline_plan(p, m), [1.0] * p, [2.0] * p)
        assert t.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))


def test_fill_counts_and_placement():
    assert default_num_fill_microbatches(4, 2.0) == 2 and default_num_fill_microbatches(2, 2.0) == 0
    assert default_num_fill_microbatches(8, 1.0) == 3
    fill = build_fill_plan(
        4, exit_stages=[0, 1, 2, 3], num_warmup_fill=2, num_cooldown_fill=2, backward_forward_ratio=2.0
    )
    assert fill == FillPlan(warmup_reach=(1, 0), cooldown_stop=(1, 2))
    # Warm-up items that would reach no exit train nothing and are dropped.
    assert build_fill_plan(4, [2, 3], 2, 0, 2.0).warmup_reach == ()
    plan = pipeline_plan(4, 4, fill)
    assert names(plan[0]) == "FR0 FR1 FR2 fw0 FR3 fw1 bw0 bw1 BR0 fc0 fc1 BR1 BR2 BR3"
    assert names(plan[1]) == "FR0 FR1 FR2 fw0 bw0 BR0 FR3 BR1 fc0 fc1 BR2 BR3 bc0"
    assert names(plan[3]).endswith("fc0 fc1 bc0 bc1")
    assert not [a for a in plan[0] if a.item == ("C", 0)][0].graph  # its backward stops before stage 0
    fw1 = [a for a in plan[0] if a.item == ("W", 1)]
    assert [a.send for a in fw1] == [False, False]  # W1 stays on stage 0
    # Warm-up fill lives in the bubble: little or no extra time.
    base = simulate(pipeline_plan(8, 16), [1.0] * 8, [2.0] * 8).makespan
    filled = simulate(pipeline_plan(8, 16, build_fill_plan(8, [0, 1], 4, 0, 2.0)), [1.0] * 8, [2.0] * 8).makespan
    assert filled == base


def test_exit_tuning_plan_has_no_backward_communication():
    for s in range(3):
        plan = exit_tuning_plan(3, s, 4)
        assert [a.kind for a in plan] == ["F", "B"] * 4
        assert not any(a.recv or a.send for a in plan if a.kind == "B")


# -- training runs ---------------------------------------------------------------

PP_FLAGS = {"--num-layers": 8, "--exit-layer-nums": "2 5 7", "--exit-layer-weight": "0.3 0.3 0.3"}


@pytest.fixture(scope="module")
def pipeline_runs(request):
    return launch_grouped("tests.multiproc.cases_pipeline_training", request)


def _ok(result):
    assert result["ok"], result["error"]
    return result["metrics"]


def _same_history(got, expected, tol=1e-5):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for key in e:
            if "loss" in key:
                assert abs(g[key] - e[key]) <= tol * max(1.0, abs(e[key])), (key, g[key], e[key])


@pytest.mark.multiproc
def test_pp2_dp2_training_equals_one_process(dist1, corpus, pipeline_runs):
    got = _ok(pipeline_runs["case_pp2_dp2_history"])
    reference = run_training(tiny_run_flags(corpus, iters=4, **PP_FLAGS))
    _same_history(got["history"], reference.history)
    _same_history(got["validation"], reference.validation)
    assert set(got["history"][0]) >= {"lm loss", "early loss [2]", "early loss [5]", "early loss [7]"}


@pytest.mark.multiproc
def test_pp4_training_keeps_tied_copies_identical(dist1, corpus, pipeline_runs):
    got = _ok(pipeline_runs["case_pp4_tied_copies_stay_identical"])
    _same_history(got["history"], run_training(tiny_run_flags(corpus, iters=3, **PP_FLAGS)).history)


@pytest.mark.multiproc
def test_pp2_exit_tuning_trains_only_exits_like_one_process(dist1, corpus, pipeline_runs):
    from megatron.early_exit.sharding import full_state_dict

    got = {k: torch.tensor(v) for k, v in _ok(pipeline_runs["case_pp2_exit_tuning"])["params"].items()}
    flags = {**PP_FLAGS, "--tune-exit": None, "--untie-exit-output-weights": None}
    tuned = full_state_dict(run_training(tiny_run_flags(corpus, iters=3, **flags)).model.module)
    initial = full_state_dict(
        run_training(
            tiny_run_flags(corpus, iters=1, **{**flags, "--lr": 0.0, "--min-lr": 0.0, "--lr-warmup-iters": 0})
        ).model.module
    )
    # The last stage's tied output layer is a copy of the (frozen) embedding.
    assert set(got) - set(tuned) == {"output_layer.weight"}
    assert torch.equal(got["output_layer.weight"], initial["embedding.word_embeddings.weight"])
    for name in tuned:
        if name.startswith("exits."):
            torch.testing.assert_close(got[name], tuned[name], rtol=0, atol=1e-5, msg=name)
            assert not torch.equal(got[name], initial[name]), name
        else:
            assert torch.equal(got[name], initial[name]), name  # backbone bit-identical


@pytest.mark.multiproc
def test_pp4_bubble_filling_runs(pipeline_runs):
    history = _ok(pipeline_runs["case_pp4_bubble_filling_trains"])["history"]
    assert len(history) == 3


def test_loss_scale_applies_to_exit_losses(dist1):
    """fp16: exit terms are multiplied by the loss scale like the final loss."""
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.loss import early_exit_loss
    from megatron.early_exit.pipeline.schedules import forward_backward_no_pipelining
    from tests.helpers import build_ee_gpt, make_batch, tiny_transformer_config

    ee_config = EarlyExitConfig(exit_layer_nums=[2], untie_exit_output_weights=True)
    model = build_ee_gpt(tiny_transformer_config(), ee_config)

    def step(data_iterator, model):
        tokens, labels, pos = next(data_iterator)
        return model(tokens, pos, None, labels=labels), lambda o: early_exit_loss(
            o, torch.ones_like(labels), ee_config, 0
        )

    grads = []
    for scale in (1.0, 1024.0):
        model.zero_grad()
        forward_backward_no_pipelining(
            step, iter([make_batch(seed=s) for s in range(2)]), model, 2, loss_scale=lambda loss: loss * scale
        )
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name] * 1024.0, msg=name)
    assert grads[0]["exits.2.output_layer.weight"].abs().sum() > 0


# Bubble filling into idle slots only (pipeline/fill.py).

from megatron.early_exit.pipeline.fill import StageCosts, idle_fill_plan  # noqa: E402


def _exit_costs(p):  # exits on the first half of the stages, as EE-LLM places them
    return [0.45 if s < max(1, p // 2) else 0.0 for s in range(p)]


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_idle_fill_costs_no_time(p, m):
    costs = StageCosts.uniform(p, 2.0, _exit_costs(p))
    planned = idle_fill_plan(p, m, list(range(max(1, p // 2))), costs)
    check_plan(planned.plan)
    plain = simulate(pipeline_plan(p, m), costs.forward, costs.backward, costs.exit)
    filled = simulate(planned.plan, costs.forward, costs.backward, costs.exit)
    assert filled.makespan == pytest.approx(plain.makespan, abs=1e-9)
    # No action of the plain schedule moves: fill items only use time it leaves idle.
    starts = {(s, a.kind, a.item): t for s, spans in enumerate(filled.spans) for t, _, a in spans}
    for s, spans in enumerate(plain.spans):
        for t, _, a in spans:
            assert starts[(s, a.kind, a.item)] == pytest.approx(t, abs=1e-9)
    items = [a.item for actions in planned.plan for a in actions if a.item[0] != "R"]
    assert set(items) == {("W", j) for j in range(len(planned.fill.warmup_reach))} | {
        ("C", j) for j in range(len(planned.fill.cooldown_stop))
    }
    if p >= 4:  # the early stages' warm-up bubble holds at least one item with an exit
        assert planned.fill.warmup_reach
    assert filled.bubble_fraction <= plain.bubble_fraction


def test_idle_fill_items_follow_their_kind_and_caps():
    costs = StageCosts((1.0, 1.0, 1.0, 2.0), (2.0, 2.0, 2.0, 4.0), (0.5, 0.5, 0.5, 0.5))
    planned = idle_fill_plan(4, 4, [0, 1, 2, 3], costs)
    assert planned.fill.warmup_reach and planned.fill.cooldown_stop
    for s, actions in enumerate(planned.plan):
        for a in actions:
            if a.item[0] == "W":  # forward through 0..reach, backward back to 0
                assert s <= planned.fill.warmup_reach[a.item[1]]
            if a.item[0] == "C" and a.kind == "B":  # backward from the last stage to stop
                assert s >= planned.fill.cooldown_stop[a.item[1]]
    capped = idle_fill_plan(4, 4, [0, 1, 2, 3], costs, max_warmup=1, max_cooldown=0)
    assert len(capped.fill.warmup_reach) == 1 and capped.fill.cooldown_stop == ()
    # Without exits on the first stages, warm-up items would train nothing: none is added.
    assert idle_fill_plan(4, 4, [3], costs).fill.warmup_reach == ()


def test_run_pipeline_plan_follows_the_flags():
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.models.model_config import ModelConfig
    from megatron.early_exit.training.bubble_fill import run_pipeline_plan
    from megatron.early_exit.training.run_config import ScheduleConfig

    ee = EarlyExitConfig(exit_layer_nums=[1, 3], use_exit_norm=True)
    model = ModelConfig(
        num_layers=8,
        hidden_size=64,
        num_attention_heads=4,
        padded_vocab_size=512,
        max_position_embeddings=64,
        ffn_hidden_size=256,
        swiglu=False,
        early_exit=ee,
    )
    schedule = ScheduleConfig(
        fill_explicit_bubbles=True,
        fill_placement="idle",
        backward_forward_ratio=2.0,
        num_fill_warmup_microbatches=None,
        num_fill_cooldown_microbatches=None,
    )
    plan, fill = run_pipeline_plan(schedule, model, 64, 8, 4, 8, 512)
    check_plan(plan)
    assert len(plan) == 4 and fill.warmup_reach
    fixed_plan, fixed = run_pipeline_plan(
        dataclasses.replace(schedule, fill_placement="fixed"), model, 64, 8, 4, 8, 512
    )
    assert fixed == build_fill_plan(4, [0, 1], 2, 2, 2.0)
    off, none = run_pipeline_plan(dataclasses.replace(schedule, fill_explicit_bubbles=False), model, 64, 8, 4, 8, 512)
    assert none is None and off == pipeline_plan(4, 8)
