"""NCCL's rendezvous rule, replayed on the communication the pipeline code issues (pure
Python): a send completes only once its peer posted the matching receive, a pair's ops
match in issue order, a stage's ops run in issue order on their stream, a wait blocks."""

import random

import pytest

from megatron.early_exit.inference.pipeline import Compute, Undecided, follow_order, lead_order
from megatron.early_exit.pipeline.plan import (
    Action,
    Op,
    Post,
    Wait,
    build_fill_plan,
    check_plan,
    check_rendezvous,
    default_num_fill_microbatches,
    executor_program,
    exit_tuning_plan,
    pipeline_plan,
)


def f(j):
    return ("F", ("R", j))


def b(j):
    return ("B", ("R", j))


def _blocking_recv(peer, message):
    op = Op(False, peer, message)
    return [Post((op,)), Wait((op,))]


def test_old_unpaired_pattern_deadlocks():
    """PP=2, m=2 as the executor used to run it: isend, then one blocking irecv at a time."""
    stage0 = [
        Post((Op(True, 1, f(0)),)),
        Post((Op(True, 1, f(1)),)),
        *_blocking_recv(1, b(0)),
        *_blocking_recv(1, b(1)),
    ]
    stage1 = [
        *_blocking_recv(0, f(0)),
        Post((Op(True, 0, b(0)),)),
        *_blocking_recv(0, f(1)),
        Post((Op(True, 0, b(1)),)),
    ]
    with pytest.raises(ValueError, match="deadlocks") as error:
        check_rendezvous([stage0, stage1])
    message = str(error.value)
    assert "stage 0 blocks on recv ('B', ('R', 0)) from stage 1" in message
    assert "stage 1 blocks on recv ('F', ('R', 1)) from stage 0" in message


def test_paired_pattern_of_the_same_plan_is_safe():
    plan = pipeline_plan(2, 2)
    programs = [executor_program(s, actions) for s, actions in enumerate(plan)]
    # Stage 0 sends F1 together with the receive of B0, stage 1 B0 with the receive of F1.
    assert Post((Op(True, 1, f(1)), Op(False, 1, b(0)))) in programs[0]
    assert Post((Op(True, 0, b(0)), Op(False, 0, f(1)))) in programs[1]
    check_rendezvous(programs)


def test_checker_reports_mismatched_and_unmatched_messages():
    with pytest.raises(ValueError, match="meets"):
        check_rendezvous([[Post((Op(True, 1, f(0)),))], [*_blocking_recv(0, f(1))]])
    with pytest.raises(ValueError, match="sends 1 messages to stage 1, which receives 0"):
        check_rendezvous([[Post((Op(True, 1, f(0)),))], []])
    with pytest.raises(ValueError, match="before posting it"):
        check_rendezvous([[Wait((Op(False, 1, b(0)),))], []])


def test_cooldown_fill_needs_its_receives_posted_with_the_send():
    """Stage 0 forwards C0..C2 before taking B1; stage 1 sends B1 before taking C0. Pairing
    alone waits in a circle; posting B1's receive with C0's send does not."""
    plan = pipeline_plan(2, 2, build_fill_plan(2, [0, 1], 0, 3, 2.0))
    c0 = next(a for a in plan[0] if a.item == ("C", 0))
    assert c0.replies_first == (b(0), b(1))
    check_plan(plan)
    unmarked = [[Action(a.kind, a.item, a.recv, a.send, a.graph) for a in actions] for actions in plan]
    with pytest.raises(ValueError, match="deadlocks"):
        check_rendezvous([executor_program(s, actions) for s, actions in enumerate(unmarked)])


def _fill_plans(p):
    """Every kind of fill plan the trainer can build for p stages: EE-LLM's default counts
    and explicit warm-up / cool-down counts, exits on the first stages or everywhere."""
    fills = [None]
    for ratio in (1.0, 2.0):
        default = default_num_fill_microbatches(p, ratio)
        for exits in ([0], [0, 1], list(range(p))):
            for warmup, cooldown in {(default, default), (0, 3), (3, 0), (2, 2), (4, 1)}:
                fills.append(build_fill_plan(p, exits, warmup, cooldown, ratio))
    return list(dict.fromkeys(fills))


def _check_plans(p, microbatch_counts):
    for m in microbatch_counts:
        for fill in _fill_plans(p):
            plan = pipeline_plan(p, m, fill)
            check_plan(plan)  # includes the replay
            programs = [executor_program(s, actions) for s, actions in enumerate(plan)]
            check_rendezvous(programs, one_lane=True)
            # Evaluation runs the real forwards only.
            forwards = [[a for a in actions if a.kind == "F" and a.item[0] == "R"] for actions in plan]
            check_rendezvous([executor_program(s, actions) for s, actions in enumerate(forwards)])
        check_plan([exit_tuning_plan(p, s, m) for s in range(p)])


@pytest.mark.parametrize("p", range(2, 9))
def test_plans_at_the_schedules_boundaries_are_deadlock_free(p):
    """The microbatch counts where the schedule changes shape: fewer, as many and more than
    the stages (warm-up cut short, exactly filled, a steady phase), twice as many, the most."""
    _check_plans(p, sorted({1, 2, p - 1, p, p + 1, 2 * p - 1, 2 * p, 2 * p + 1, 32}))


@pytest.mark.slow
@pytest.mark.parametrize("p", range(2, 9))
def test_every_plan_is_deadlock_free(p):
    """Every count from 1 to 32 (make test checks the boundaries above)."""
    _check_plans(p, range(1, 33))


# -- pipeline inference ------------------------------------------------------------


def _record(order, answer_of):
    """A protocol coroutine's communication, with `answer_of(request)` standing for what the
    messages and the model would say."""
    program, answer = [], None
    while True:
        try:
            request = order.send(answer)
        except StopIteration:
            return program
        if isinstance(request, (Post, Wait)):
            program.append(request)
        answer = answer_of(request)


def inference_programs(num_stages, deciders):
    """Every stage's communication for a generation whose step t has its rows decided on
    the stages in deciders[t] (the last of them closes every row)."""
    steps = len(deciders)
    taken = {}  # step -> deepest stage whose decisions stage 0 has taken

    def lead(request):
        if isinstance(request, Compute):
            taken[request.step] = 0
            return request.step < steps
        if isinstance(request, Undecided):
            return taken[request.step] < max(deciders[request.step])
        if isinstance(request, Wait) and request.ops[0].message[0] == "decision":
            op = request.ops[0]
            step = op.message[1]
            taken[step] = max(taken.get(step, 0), op.peer)
            return int(op.peer in deciders[step])
        return None

    def follower(stage):
        def answer(request):
            if isinstance(request, Compute):
                return int(stage in deciders[request.step])
            if isinstance(request, Wait) and request.ops[0].message[0] == "step" and not request.ops[0].send:
                return request.ops[0].message[1] < steps
            return None

        return answer

    return [_record(lead_order(num_stages), lead)] + [
        _record(follow_order(s, num_stages), follower(s)) for s in range(1, num_stages)
    ]


def _scenarios(p, rng):
    yield [{p - 1}]  # prefill only
    yield [{p - 1}] + [{0}] * 12  # every row leaves on stage 0: stage 0 runs ahead
    yield [{p - 1}] + [{p - 1}] * 12  # full depth
    yield [{p - 1}] + [{k % p, p - 1} if k % 3 else {k % p} for k in range(20)]
    for _ in range(6):
        deciders = [{p - 1}]
        for _ in range(rng.randint(1, 24)):
            deepest = rng.randrange(p)
            deciders.append({deepest} | {k for k in range(deepest) if rng.random() < 0.4})
        yield deciders


@pytest.mark.parametrize("p", range(2, 9))
def test_pipeline_inference_pattern_is_deadlock_free(p):
    rng = random.Random(p)
    for deciders in _scenarios(p, rng):
        programs = inference_programs(p, deciders)
        check_rendezvous(programs)  # plain isend/irecv: one stream per pair of stages
        check_rendezvous(programs, one_lane=True)  # and even on one stream per stage


def _peak_in_flight(program):
    in_flight, peak = set(), 0
    for step in program:
        if isinstance(step, Post) and step.ops[0].send:
            in_flight.update(step.ops)
        elif isinstance(step, Wait):
            in_flight.difference_update(step.ops)
        peak = max(peak, len(in_flight))
    return peak


def test_pipeline_inference_sends_stay_bounded():
    """However long the generation, stage k keeps at most k + 1 steps of decisions (a header
    and the decided rows' logits) and two steps of hidden states (a header each) in flight."""
    for p in (2, 3, 5, 8):
        for pattern in ([{0}], [{p - 1}], [{1 % p, p - 1}], [{0}, {p - 1}, {p // 2}]):
            peaks = []
            for steps in (16, 64):
                programs = inference_programs(p, [{p - 1}] + (pattern * steps)[:steps])
                peaks.append([_peak_in_flight(program) for program in programs])
            assert peaks[0] == peaks[1], (p, pattern, peaks)
            assert all(peak <= 2 * (k + 1) + 4 for k, peak in enumerate(peaks[1])), (p, pattern, peaks)
