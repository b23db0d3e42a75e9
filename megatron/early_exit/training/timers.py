"""Per-phase timers (megatron-core's Timers), printed every --log-interval iterations and,
with --log-timers-to-tracker, written to the trackers as `<name>-time` (ms per iteration).

Levels follow Megatron-LM's --timing-log-level: 0 the iteration only; 1 phases run once per
iteration (the forward-backward schedule, the optimizer step); 2 phases run once per
microbatch (forward, exit losses, backward, pipeline communication), which synchronise the
device at every start and stop. The schedule executor itself is not instrumented: its
backward is timed as what the schedule spends outside forward, losses and communication.
"""

from __future__ import annotations

import contextlib
from functools import wraps

import torch
from megatron.core.timers import Timers

# name -> level
ITERATION = "iteration"
FORWARD_BACKWARD = "forward-backward"
OPTIMIZER = "optimizer"
FORWARD = "forward-compute"
EXIT_LOSSES = "exit-losses"
BACKWARD = "backward-compute"
COMMUNICATION = "pipeline-communication"
LEVELS = {ITERATION: 0, FORWARD_BACKWARD: 1, OPTIMIZER: 1, FORWARD: 2, EXIT_LOSSES: 2, BACKWARD: 2, COMMUNICATION: 2}
PER_MICROBATCH = (FORWARD, EXIT_LOSSES, COMMUNICATION)


def build_timers(timing_log_level: int, timing_log_option: str) -> Timers:
    """--timing-log-level and --timing-log-option."""
    return Timers(timing_log_level, timing_log_option)


def is_enabled(timers: Timers, name: str) -> bool:
    return LEVELS[name] <= timers._log_level  # Timers keeps its level to itself


def timed(timers: Timers, name: str, fn):
    """`fn` with its calls accumulated in timer `name`."""

    @wraps(fn)
    def call(*args, **kwargs):
        with timing(timers, name):
            return fn(*args, **kwargs)

    return call


def timed_forward_step(timers: Timers, forward_step):
    """A forward step timed, and the loss function it returns (exit heads and losses) too."""

    def step(*args, **kwargs):
        output, loss_func = timed(timers, FORWARD, forward_step)(*args, **kwargs)
        return output, timed(timers, EXIT_LOSSES, loss_func)

    return step


class TimedLinks:
    """A pipeline stage's links with every post and wait timed as communication."""

    def __init__(self, links, timers: Timers):
        self._links, self._timers = links, timers
        self.post = timed(timers, COMMUNICATION, links.post)
        self.wait = timed(timers, COMMUNICATION, links.wait)

    def __getattr__(self, name):
        return getattr(self._links, name)


def snapshot(timers: Timers) -> dict:
    """Time spent so far in the schedule and in its per-microbatch phases."""
    if not is_enabled(timers, BACKWARD):
        return {}
    return {name: timers(name, log_level=LEVELS[name]).active_time() for name in (FORWARD_BACKWARD,) + PER_MICROBATCH}


def add_backward_time(timers: Timers, before: dict) -> None:
    """Backward: what the schedule spent since `before` outside forwards, losses and communication."""
    if not before:
        return
    after = snapshot(timers)
    inside = sum(after[name] - before[name] for name in PER_MICROBATCH)
    backward = timers(BACKWARD, log_level=LEVELS[BACKWARD])
    backward.set_elapsed(
        backward.elapsed(reset=False) + max(after[FORWARD_BACKWARD] - before[FORWARD_BACKWARD] - inside, 0.0)
    )


def enabled_names(timers: Timers):
    return [name for name in LEVELS if is_enabled(timers, name)]


def log_timers(
    timers: Timers,
    iteration: int,
    num_iterations: int,
    device: torch.device,
    print_here: bool,
    to_tracker: bool = False,
    writer=None,
) -> None:
    """Print the timers (ms per iteration over the last `num_iterations`; min and max over
    ranks as --timing-log-option says) at --timing-log-level 1 or more (at 0 the log line's
    time per iteration says it all, as in Megatron-LM), with `to_tracker` write each one's max
    over ranks to `writer` as `<name>-time`, and reset them. Every rank calls it (the times
    are gathered)."""
    names = enabled_names(timers)
    if is_enabled(timers, FORWARD_BACKWARD):
        text = timers.get_all_timers_string(names, normalizer=num_iterations, reset=False)
        if print_here and text:
            print(text, flush=True)
    if to_tracker:
        ms = torch.tensor([timers(n, log_level=LEVELS[n]).elapsed(reset=False) for n in names], device=device)
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(ms, op=torch.distributed.ReduceOp.MAX)
        if writer is not None:
            for name, value in zip(names, ms.tolist()):
                writer.add_scalar(f"{name}-time", value * 1000.0 / num_iterations, iteration)
    for name in names:
        timers(name, log_level=LEVELS[name]).reset()


@contextlib.contextmanager
def timing(timers: Timers, name: str):
    """Time the block in timer `name`."""
    timer = timers(name, log_level=LEVELS[name])
    timer.start()
    try:
        yield
    finally:
        timer.stop()
