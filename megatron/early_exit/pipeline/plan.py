"""Pipeline schedules as plans: for every stage, the ordered list of its actions.

A plan is pure data, built without a model, so it can be printed, checked
(every backward after its forward, every send matched by a receive in the same
order) and simulated into a timeline. One executor (`executor.py`) runs any plan.

Items are microbatches: ("R", j) the j-th real microbatch, ("W", j) the j-th
warm-up fill microbatch, ("C", j) the j-th cool-down fill microbatch.

1F1B on stage s of p with m microbatches reads as its timeline:
    warm-up    min(p-1-s, m) forwards
    steady     (forward, backward) pairs
    cool-down  the remaining backwards
Exit losses need no extra actions: a stage's backward of an item back-propagates
its exit losses together with the gradient from the next stage.

Bubble filling (EE-LLM). With backward/forward cost ratio r, stage s idles about
(p-1-s) backward-times before its first backward (warm-up bubble) and about s
backward-times after its last one (cool-down bubble); int((p-1)*r/(1+r)) extra
microbatches of forward+backward fit in the largest of them.
  * Warm-up fill item W_j is forwarded through stages 0..reach_j only and
    back-propagates the exit losses it meets there; it trains only exits on those
    stages and the layers below them. Items are placed right after the forward of
    the (p-1)-th real microbatch, which keeps sends and receives in the same order
    on both sides of a link; that placement is consistent for stages 0 and 1, so
    warm-up fill reaches at most stage 1 (EE-LLM's "first few stages").
  * Cool-down fill item C_j is forwarded through all stages after the real
    microbatches; its backward starts at the last stage and stops at stage
    stop_j = floor(j*(1+r)/r) + 1 (it does not send gradients further up), so it
    trains the final head, the exits and the layers of stages >= stop_j only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

Item = Tuple[str, int]


@dataclass(frozen=True)
class Action:
    kind: str  # "F" forward or "B" backward
    item: Item
    recv: bool  # F: input from the previous stage; B: gradient from the next stage
    send: bool  # F: output to the next stage; B: gradient to the previous stage
    graph: bool = True  # F: a backward of this item follows on this stage (else no autograd graph)

    def __str__(self) -> str:
        tag = f"{self.kind}{self.item[0]}{self.item[1]}"
        return tag if self.item[0] == "R" else tag.lower()


@dataclass(frozen=True)
class FillPlan:
    """Which fill items exist and where they go."""

    warmup_reach: Tuple[int, ...] = ()  # deepest stage of each warm-up fill item
    cooldown_stop: Tuple[int, ...] = ()  # shallowest stage each cool-down item back-propagates through


def default_num_fill_microbatches(num_stages: int, backward_forward_ratio: float) -> int:
    """EE-LLM's count: how many forward+backward pairs fit in the largest explicit bubble."""
    r = backward_forward_ratio
    return int((num_stages - 1) * r / (1 + r))


def build_fill_plan(
    num_stages: int,
    exit_stages: Sequence[int],
    num_warmup_fill: int,
    num_cooldown_fill: int,
    backward_forward_ratio: float,
) -> FillPlan:
    """Place fill items. Warm-up items that would reach no exit are dropped: they could
    train nothing."""
    r = backward_forward_ratio

    def capacity(stage):  # fill items that fit in the stage's warm-up bubble
        return int((num_stages - 1 - stage) * r / (1 + r))

    reach = []
    for j in range(num_warmup_fill):
        fits = [s for s in range(min(2, num_stages - 1)) if capacity(s) > j]
        depth = max(fits, default=-1)
        if depth >= 0 and any(s <= depth for s in exit_stages):
            reach.append(depth)
    # Stage s has about s backward-times idle after its last real backward.
    stops = [min(num_stages - 1, math.floor(j * (1 + r) / r) + 1) for j in range(num_cooldown_fill)]
    return FillPlan(tuple(reach), tuple(stops))


def one_f_one_b(num_stages: int, stage: int, num_microbatches: int, fill: Optional[FillPlan] = None) -> List[Action]:
    """The action list of one stage."""
    p, s, m = num_stages, stage, num_microbatches
    fill = fill or FillPlan()
    first, last = s == 0, s == p - 1

    def forward(item, through=p - 1, graph=True):
        return Action("F", item, recv=not first, send=s < through, graph=graph)

    def backward(item, through=p - 1, stop=0):
        return Action("B", item, recv=s < through, send=s > stop)

    # Real microbatches in 1F1B order.
    warmup = min(p - 1 - s, m)
    order = [forward(("R", j)) for j in range(warmup)]  # warm-up
    for j in range(warmup, m):  # steady state: one forward, one backward
        order += [forward(("R", j)), backward(("R", j - warmup))]
    order += [backward(("R", j)) for j in range(m - warmup, m)]  # cool-down

    # Fill items go at fixed points of the real sequence, so that both sides of
    # every link see the same order.
    fill_fwd, fill_bwd = _warmup_fill(fill, s, forward, backward)
    fill_after = min(p - 2, m - 1)  # fill items sent on follow this real forward
    # On stage 0, items that stay local (and all fill backwards) wait for the next
    # real forward: they fill the bubble before its first real backward.
    late_after = min(p - 1, m - 1) if first else fill_after
    early_fwd = [a for a in fill_fwd if a.send or not first]
    late = [a for a in fill_fwd if a not in early_fwd] + fill_bwd
    cool_fwd = [forward(("C", j), graph=s >= stop) for j, stop in enumerate(fill.cooldown_stop)]
    cool_bwd = [backward(("C", j), stop=stop) for j, stop in enumerate(fill.cooldown_stop) if s >= stop]
    last_real_forward = next((i for i, a in enumerate(order) if a.kind == "F" and a.item == ("R", m - 1)), None)
    actions: List[Action] = []
    for i, a in enumerate(order):
        actions.append(a)
        if a.kind == "F" and a.item == ("R", fill_after):
            actions += early_fwd
        if a.kind == "F" and a.item == ("R", late_after):
            actions += late
        # Cool-down fill forwards wait until the backward after the last real forward,
        # where the stage starts to have gaps.
        if last_real_forward is not None and i == min(last_real_forward + 1, len(order) - 1):
            actions += cool_fwd
    return actions + cool_bwd


def _warmup_fill(fill: FillPlan, s: int, forward, backward):
    items = [(("W", j), reach) for j, reach in enumerate(fill.warmup_reach) if s <= reach]
    return [forward(item, through=reach) for item, reach in items], [backward(item, through=reach) for item, reach in items]


def pipeline_plan(num_stages: int, num_microbatches: int, fill: Optional[FillPlan] = None) -> List[List[Action]]:
    return [one_f_one_b(num_stages, s, num_microbatches, fill) for s in range(num_stages)]


def exit_tuning_plan(num_stages: int, stage: int, num_microbatches: int) -> List[Action]:
    """--tune-exit: the backbone is frozen, so no gradient crosses stages: each stage
    forwards a microbatch, then back-propagates its own exit losses locally."""
    actions = []
    for j in range(num_microbatches):
        actions.append(Action("F", ("R", j), recv=stage > 0, send=stage < num_stages - 1))
        actions.append(Action("B", ("R", j), recv=False, send=False))
    return actions


# ---------------------------------------------------------------------------
# Checks and simulation
# ---------------------------------------------------------------------------


def check_plan(plan: List[List[Action]]) -> None:
    """Raise if a backward precedes its forward or sends and receives do not pair up in order."""
    for s, actions in enumerate(plan):
        seen = set()
        for a in actions:
            if a.kind == "F":
                seen.add(a.item)
            elif a.item not in seen:
                raise ValueError(f"stage {s}: backward of {a.item} before its forward")
    for s in range(len(plan) - 1):
        sent = [a.item for a in plan[s] if a.kind == "F" and a.send]
        received = [a.item for a in plan[s + 1] if a.kind == "F" and a.recv]
        if sent != received:
            raise ValueError(f"forward link {s}->{s + 1}: sends {sent} but receives {received}")
        sent = [a.item for a in plan[s + 1] if a.kind == "B" and a.send]
        received = [a.item for a in plan[s] if a.kind == "B" and a.recv]
        if sent != received:
            raise ValueError(f"backward link {s + 1}->{s}: sends {sent} but receives {received}")


@dataclass
class Timeline:
    spans: List[List[Tuple[float, float, Action]]]  # per stage: (start, end, action)
    makespan: float

    @property
    def bubble_fraction(self) -> float:
        busy = sum(end - start for spans in self.spans for start, end, _ in spans)
        return 1.0 - busy / (len(self.spans) * self.makespan) if self.makespan else 0.0

    def render(self, width: int = 100) -> str:
        """Text chart: one row per stage, time left to right."""
        scale = width / self.makespan if self.makespan else 1.0
        rows = []
        for s, spans in enumerate(self.spans):
            row = [" "] * width
            for start, end, action in spans:
                label = str(action)
                a, b = int(round(start * scale)), max(int(round(end * scale)), int(round(start * scale)) + 1)
                for t in range(a, min(b, width)):
                    row[t] = "."
                text = label[: max(0, b - a)]
                for k, ch in enumerate(text):
                    if a + k < width:
                        row[a + k] = ch
            rows.append(f"stage {s} |" + "".join(row) + "|")
        return "\n".join(rows)


def simulate(
    plan: List[List[Action]],
    forward_cost: Sequence[float],
    backward_cost: Sequence[float],
    exit_cost: Optional[Sequence[float]] = None,
) -> Timeline:
    """Earliest-start timeline: an action starts when its stage is free and its input
    (activation or gradient) has been produced. Per-stage costs; `exit_cost` is added
    to every backward of a stage that owns exits (its heads run just before backward)."""
    p = len(plan)
    exit_cost = exit_cost or [0.0] * p
    done: Dict[Tuple[str, Item, int], float] = {}
    pos = [0] * p
    clock = [0.0] * p
    spans: List[List[Tuple[float, float, Action]]] = [[] for _ in range(p)]
    progressed = True
    while progressed:
        progressed = False
        for s in range(p):
            while pos[s] < len(plan[s]):
                a = plan[s][pos[s]]
                if a.recv:
                    src = ("F", a.item, s - 1) if a.kind == "F" else ("B", a.item, s + 1)
                    if src not in done:
                        break
                    ready = done[src]
                else:
                    ready = 0.0
                cost = forward_cost[s] if a.kind == "F" else backward_cost[s] + exit_cost[s]
                start = max(clock[s], ready)
                clock[s] = start + cost
                done[(a.kind, a.item, s)] = clock[s]
                spans[s].append((start, clock[s], a))
                pos[s] += 1
                progressed = True
    stuck = [s for s in range(p) if pos[s] < len(plan[s])]
    if stuck:
        raise ValueError(f"plan deadlocks: stages {stuck} wait forever at {[str(plan[s][pos[s]]) for s in stuck]}")
    return Timeline(spans, max(clock))
