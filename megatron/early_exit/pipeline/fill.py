"""Bubble filling into idle time only: fill items placed where 1F1B leaves a stage waiting.

EE-LLM's filling (`plan.build_fill_plan`) adds a fixed count of items at fixed points of
the schedule; with exit heads and a final head that make stages unequal, part of that work
lands on the critical path and the iteration gets longer. Here the plain early-exit 1F1B
timeline is simulated with a cost per stage, and an item is kept only if each of its
actions fits in a gap of that timeline: it starts once its input exists, ends before the
stage's next action would have started, and so no action of the plain schedule moves.
The makespan with filling therefore equals the makespan without it, by construction and
checked: every candidate plan is re-simulated and verified (link order, NCCL rendezvous).

Items are the same two kinds as EE-LLM's, so the executor and the data path need nothing new:
    W (warm-up)   forward through stages 0..reach, backward from reach to 0: trains the
                  exits of stages <= reach and the layers below them
    C (cool-down) forward through every stage, backward from the last stage to `stop`:
                  trains the final head, the exits of stages >= stop and their layers
Candidates are tried largest-first (the item that trains the most stages), and the search
stops when none fits or the caps are reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from megatron.early_exit.pipeline.plan import (
    Action,
    FillPlan,
    Item,
    _mark_replies,
    check_plan,
    one_f_one_b,
    simulate,
)


@dataclass(frozen=True)
class StageCosts:
    """Time of one microbatch on each stage: its forward, its backward, and the exit heads
    it owns (run just before its backward)."""

    forward: Tuple[float, ...]
    backward: Tuple[float, ...]
    exit: Tuple[float, ...]

    @classmethod
    def uniform(cls, num_stages: int, backward_forward_ratio: float, exit_cost: Sequence[float] = ()) -> "StageCosts":
        return cls(
            (1.0,) * num_stages, (float(backward_forward_ratio),) * num_stages, tuple(exit_cost) or (0.0,) * num_stages
        )


@dataclass
class IdleFill:
    plan: List[List[Action]]  # marked for the executor, checked
    fill: FillPlan  # the items it holds (for the data path: how many of each kind)
    makespan: float
    plain_makespan: float


def idle_fill_plan(
    num_stages: int,
    num_microbatches: int,
    exit_stages: Sequence[int],
    costs: StageCosts,
    max_warmup: Optional[int] = None,
    max_cooldown: Optional[int] = None,
) -> IdleFill:
    p = num_stages
    plan = [one_f_one_b(p, s, num_microbatches) for s in range(p)]
    base = _timeline(plan, costs)
    fixed = _starts(base)
    horizon = base.makespan  # nothing may end after the plain schedule does
    warmup: List[int] = []
    cooldown: List[int] = []
    while True:
        placed = None
        for kind, depth in _candidates(p, exit_stages, len(warmup), len(cooldown), max_warmup, max_cooldown):
            item = (kind, len(warmup) if kind == "W" else len(cooldown))
            trial = _place(plan, item, depth, costs, horizon)
            if trial is not None and _keeps(trial, costs, fixed):
                placed = (kind, depth, trial)
                break
        if placed is None:
            break
        kind, depth, plan = placed
        (warmup if kind == "W" else cooldown).append(depth)
    marked = _mark_replies(plan)
    check_plan(marked)
    makespan = simulate(marked, costs.forward, costs.backward, costs.exit).makespan
    return IdleFill(marked, FillPlan(tuple(warmup), tuple(cooldown)), makespan, base.makespan)


def _candidates(p, exit_stages, n_warm, n_cool, max_warmup, max_cooldown):
    """(kind, depth) by decreasing training value: W reach deepest first, C stop shallowest first."""
    out = []
    if max_warmup is None or n_warm < max_warmup:
        out += [("W", reach) for reach in range(p - 2, -1, -1) if any(s <= reach for s in exit_stages)]
    if max_cooldown is None or n_cool < max_cooldown:
        out += [("C", stop) for stop in range(1, p)]
    return out


def _timeline(plan, costs):
    return simulate(_mark_replies(plan), costs.forward, costs.backward, costs.exit)


def _starts(timeline) -> Dict[Tuple[int, str, Item], float]:
    return {(s, a.kind, a.item): start for s, spans in enumerate(timeline.spans) for start, _, a in spans}


def _keeps(plan, costs, fixed) -> bool:
    """The candidate runs, and every action placed before starts exactly when it did."""
    try:
        check_plan(_mark_replies(plan))
        starts = _starts(_timeline(plan, costs))
    except ValueError:
        return False
    return all(abs(starts[key] - t) < 1e-9 for key, t in fixed.items())


def _place(plan, item: Item, depth: int, costs: StageCosts, horizon: float):
    """Insert `item` into the earliest gaps that hold it, stage by stage along its path;
    None when some stage has no such gap."""
    p = len(plan)
    kind = item[0]
    reach, stop = (depth, 0) if kind == "W" else (p - 1, depth)
    timeline = _timeline(plan, costs)
    new = [list(actions) for actions in plan]
    spans = [list(s) for s in timeline.spans]
    ready = 0.0
    for s in range(reach + 1):
        action = Action("F", item, recv=s > 0, send=s < reach, graph=s >= stop)
        slot = _gap(new, spans, s, action, ready, costs.forward[s], horizon)
        if slot is None:
            return None
        ready = _insert(new, spans, s, slot, action, ready, costs.forward[s])
    for s in range(reach, stop - 1, -1):
        action = Action("B", item, recv=s < reach, send=s > stop)
        slot = _gap(new, spans, s, action, ready, costs.backward[s] + costs.exit[s], horizon)
        if slot is None:
            return None
        ready = _insert(new, spans, s, slot, action, ready, costs.backward[s] + costs.exit[s])
    return new


def _gap(plan, spans, s, action, ready, cost, horizon) -> Optional[int]:
    """Index before which `action` fits on stage s: after its input is ready, before the
    next action's start, and in the same place among the link's messages as on the peer."""
    rows = spans[s]
    for i in range(len(rows) + 1):
        start = max(ready, rows[i - 1][1] if i else 0.0)
        if start + cost > (rows[i][0] if i < len(rows) else horizon) + 1e-9:
            continue
        if action.kind == "B" and any(a.kind == "F" and a.item == action.item for a in plan[s][i:]):
            continue
        if action.recv and not _in_link_order(plan, s, i, action):
            continue
        return i
    return None


def _in_link_order(plan, s, i, action) -> bool:
    """The peer sent this message after some messages of the link; stage s must receive it
    after exactly those."""
    q = action.peer(s, False)
    sent = [a.message for a in plan[q] if a.send and a.peer(q, True) == s]
    before = sent[: sent.index(action.message)]
    received_before = [a.message for a in plan[s][:i] if a.recv and a.peer(s, False) == q]
    return received_before == before


def _insert(plan, spans, s, i, action, ready, cost) -> float:
    start = max(ready, spans[s][i - 1][1] if i else 0.0)
    plan[s].insert(i, action)
    spans[s].insert(i, (start, start + cost, action))
    return start + cost


def stage_costs(
    config, ee_config, num_stages: int, vocab_size: int, seq_length: int, backward_forward_ratio: float
) -> StageCosts:
    """Per-stage costs from FLOPs (flops.py): layers on every stage, the final head on the
    last, exit heads (forward and backward, in the backward action) where they live."""
    from megatron.early_exit.flops import exit_heads_flops, layer_flops, output_layer_flops
    from megatron.early_exit.pipeline.placement import exit_stages

    r, tokens = backward_forward_ratio, seq_length
    layers = config.num_layers // num_stages * layer_flops(config, tokens, seq_length)
    head = output_layer_flops(config, tokens, vocab_size)
    forward = [layers + (head if s == num_stages - 1 else 0.0) for s in range(num_stages)]
    per_exit = exit_heads_flops(config, ee_config, tokens, seq_length, vocab_size) / max(ee_config.num_exits, 1)
    exits = [0.0] * num_stages
    for s in exit_stages(ee_config, config.num_layers, num_stages):
        exits[s] += per_exit * (1 + r)
    scale = forward[0] or 1.0  # in units of the first stage's forward
    return StageCosts(
        tuple(f / scale for f in forward), tuple(r * f / scale for f in forward), tuple(e / scale for e in exits)
    )
