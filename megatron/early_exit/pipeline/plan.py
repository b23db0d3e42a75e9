"""Pipeline schedules as plans: for every stage, the ordered list of its actions.

A plan is pure data, built without a model, so it can be printed, checked
(every backward after its forward, every send matched by a receive in the same
order, no deadlock under NCCL's rendezvous rule) and simulated into a timeline.
One executor (`schedules.run_schedule`) runs any plan, posting at each action
boundary the batch `executor_steps` names: the send of the action just run
together with the receive of the next one (and, where the peer sends first,
the receives of what it sends before taking this one: `Action.replies_first`).

Items are microbatches: ("R", j) the j-th real microbatch, ("W", j) the j-th
warm-up fill microbatch, ("C", j) the j-th cool-down fill microbatch. Interleaved plans
(pipeline/interleaved.py) also name the model chunk of every action; plans of one chunk
leave it at 0.

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
from collections import deque
from dataclasses import dataclass, replace
from typing import Dict, Hashable, List, Optional, Sequence, Tuple, Union

Item = Tuple[str, int]


@dataclass(frozen=True)
class Action:
    kind: str  # "F" forward or "B" backward
    item: Item
    recv: bool  # F: input from the previous stage; B: gradient from the next stage
    send: bool  # F: output to the next stage; B: gradient to the previous stage
    graph: bool = True  # F: a backward of this item follows on this stage (else no autograd graph)
    # A send: what its peer sends this stage before receiving it. NCCL runs a stage's ops
    # in issue order, so the executor posts those receives together with the send.
    replies_first: Tuple[Tuple, ...] = ()
    # Interleaved schedule (pipeline/interleaved.py): the stage's model chunk that runs it, and
    # `ring` the number of stages p. Chunk c of stage s is virtual stage c*p + s, so links wrap
    # around from stage p-1 to stage 0. Plans of one chunk keep the defaults.
    chunk: int = 0
    ring: int = 0
    # Runs as one step with the previous action: their sends and receives are posted as one
    # batch, before the first and after the second (megatron-core's interleaved 1F1B posts one
    # batch per forward-backward pair; posting between them can wait in a circle around the ring).
    with_previous: bool = False

    @property
    def message(self) -> Tuple[str, Item]:
        """What crosses the link: ("F", item) its activation, ("B", item) its gradient."""
        return (self.kind, self.item)

    def label(self, stage: int, send: bool) -> Tuple:
        """The message on the side of `stage` that sends (send) or receives. With chunks, one
        link carries an item once per chunk: the label adds the virtual stage downstream of the
        link crossed, which both sides compute alike."""
        if not self.ring:
            return self.message
        downstream = self.virtual_stage(stage) + (1 if (self.kind == "F") == send else 0)
        return (self.kind, self.item, downstream)

    def virtual_stage(self, stage: int) -> int:
        return self.chunk * self.ring + stage

    def peer(self, stage: int, send: bool) -> int:
        """The stage this action sends to (send) or receives from."""
        q = stage + 1 if (self.kind == "F") == send else stage - 1
        return q % self.ring if self.ring else q

    def __str__(self) -> str:
        tag = f"{self.kind}{self.item[0]}{self.item[1]}"
        tag = tag if self.item[0] == "R" else tag.lower()
        return f"{tag}.{self.chunk}" if self.ring else tag


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
    first = s == 0

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
    return [forward(item, through=reach) for item, reach in items], [
        backward(item, through=reach) for item, reach in items
    ]


def pipeline_plan(num_stages: int, num_microbatches: int, fill: Optional[FillPlan] = None) -> List[List[Action]]:
    return _mark_replies([one_f_one_b(num_stages, s, num_microbatches, fill) for s in range(num_stages)])


def _mark_replies(plan: List[List[Action]]) -> List[List[Action]]:
    """Fill each send's `replies_first`. Fill items make the two sides of a link disagree on
    how the directions interleave (stage 0 forwards C0, C1 before taking B1, stage 1 sends B1
    before taking C0): posting the receives with the send keeps NCCL from waiting in a circle."""
    marked = []
    for s, actions in enumerate(plan):
        row = []
        for a in actions:
            if a.send and 0 <= a.peer(s, True) < len(plan):
                q = a.peer(s, True)
                row.append(replace(a, replies_first=_sent_before(plan[q], q, s, a.label(s, True))))
            else:
                row.append(a)
        marked.append(row)
    return marked


def _sent_before(actions: Sequence[Action], stage: int, to: int, message) -> Tuple[Tuple, ...]:
    """Messages `stage` sends to stage `to` before it receives `message` from it (actions
    joined by `with_previous` receive before any of them sends)."""
    sent, i = [], 0
    while i < len(actions):
        group, i = actions[i : _group_end(actions, i)], _group_end(actions, i)
        if any(a.recv and a.peer(stage, False) == to and a.label(stage, False) == message for a in group):
            break
        sent += [a.label(stage, True) for a in group if a.send and a.peer(stage, True) == to]
    return tuple(sent)


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
    """Raise if a backward precedes its forward, sends and receives do not pair up in
    order, or the executor's communication would deadlock under NCCL's rendezvous rule."""
    for s, actions in enumerate(plan):
        seen = set()
        for a in actions:
            if a.kind == "F":
                seen.add((a.chunk, a.item))
            elif (a.chunk, a.item) not in seen:
                raise ValueError(f"stage {s}: backward of {a.item}{_chunk_name(a)} before its forward")
    _check_links(plan)
    check_rendezvous([executor_program(s, actions) for s, actions in enumerate(plan)])


def _chunk_name(action: Action) -> str:
    return f" (chunk {action.chunk})" if action.ring else ""


def _check_links(plan: List[List[Action]]) -> None:
    """Every link (a pair of stages, one direction) sends what its peer receives, in order."""
    for s, actions in enumerate(plan):
        for q in range(len(plan)):
            for kind, name in (("F", "forward"), ("B", "backward")):
                sent = [a.label(s, True) for a in actions if a.kind == kind and a.send and a.peer(s, True) == q]
                received = [a.label(q, False) for a in plan[q] if a.kind == kind and a.recv and a.peer(q, False) == s]
                if sent != received:
                    raise ValueError(f"{name} link {s}->{q}: sends {sent} but receives {received}")


# ---------------------------------------------------------------------------
# Communication: what the executor posts, and NCCL's rendezvous rule
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One point-to-point operation of a stage; a send and its receive carry the same message."""

    send: bool
    peer: int  # the other stage
    message: Tuple  # e.g. ("F", item): item's activation; ("B", item): its gradient

    def __str__(self) -> str:
        return f"{'send' if self.send else 'recv'} {self.message} {'to' if self.send else 'from'} stage {self.peer}"


@dataclass(frozen=True)
class Post:
    """Ops a stage posts at once (one batch), without blocking. Batches of one lane (one
    NCCL stream: the group's communicator for batch_isend_irecv, a pair's own for plain
    isend/irecv) run in issue order."""

    ops: Tuple[Op, ...]
    lane: Hashable = "group"


@dataclass(frozen=True)
class Wait:
    """The stage blocks until these ops, posted earlier, completed."""

    ops: Tuple[Op, ...]


Step = Union[Post, Wait]


def executor_steps(stage: int, actions: Sequence[Action]) -> List[Tuple[Post, Tuple[Op, ...]]]:
    """What `run_schedule` does at each action boundary (entry 0 before the first action,
    entry i + 1 after action i): the batch it posts, then the ops it waits for. A batch holds
    action i's send, the receives of what the send's peer sends first (`replies_first`) and
    action i + 1's receive, the latter two unless posted before (Megatron's
    send_forward_recv_backward and the like); actions joined by `with_previous` post as one
    (their sends after the last of them, their receives before the first). The stage waits
    when the next action needs its input, for every batch up to the one holding it; sends
    alone stay in flight. The last entry also waits for everything still in flight (the
    final flush)."""
    receives: Dict[int, List[Tuple]] = {}
    for a in actions:
        if a.recv:
            receives.setdefault(a.peer(stage, False), []).append(a.label(stage, False))
    posted = {q: 0 for q in receives}  # receives from each peer posted so far (a prefix)
    batches: List[Tuple[Op, ...]] = []
    batch_of: Dict[Tuple, int] = {}
    waited, steps, group = 0, [], 0  # group: where the actions run since the last batch start
    for i in range(len(actions) + 1):
        ops, nxt, wanted = [], actions[i] if i < len(actions) else None, []
        if nxt is None or not nxt.with_previous:
            for done in actions[group:i]:
                if done.send:
                    q = done.peer(stage, True)
                    ops.append(Op(True, q, done.label(stage, True)))
                    early = [k + 1 for k, m in enumerate(receives.get(q, [])) if m in done.replies_first]
                    wanted.append((q, max(early, default=0)))
            group = i
            for a in actions[i : _group_end(actions, i)]:
                if a.recv:
                    q = a.peer(stage, False)
                    wanted.append((q, receives[q].index(a.label(stage, False)) + 1))
        for q, upto in wanted:
            for message in receives.get(q, [])[posted.get(q, 0) : upto]:
                ops.append(Op(False, q, message))
                batch_of[message] = len(batches)
            posted[q] = max(posted.get(q, 0), upto)
        if ops:
            batches.append(tuple(ops))
        last = len(batches) if nxt is None else (batch_of[nxt.label(stage, False)] + 1 if nxt.recv else waited)
        wait = tuple(op for batch in batches[waited:last] for op in batch)
        waited = max(waited, last)
        steps.append((Post(tuple(ops)), wait))
    return steps


def _group_end(actions: Sequence[Action], i: int) -> int:
    """The first action after the one starting at i and those joined to it."""
    j = i + 1
    while j < len(actions) and actions[j].with_previous:
        j += 1
    return min(j, len(actions))


def executor_program(stage: int, actions: Sequence[Action]) -> List[Step]:
    """The executor's communication on one stage, in the checker's terms."""
    program: List[Step] = []
    for post, wait in executor_steps(stage, actions):
        program += [post] if post.ops else []
        program += [Wait(wait)] if wait else []
    return program


def check_rendezvous(programs: List[List[Step]], one_lane: bool = False) -> None:
    """Replay every stage's communication under NCCL's rule and raise ValueError naming the
    stages and ops that wait forever. The rule: ops between a pair of stages match in issue
    order; an op is posted once its batch reaches the head of its lane; a send and its
    receive complete together, once both are posted; a batch completes when all its ops
    have; a wait blocks the stage. `one_lane` puts all of a stage's ops on one stream (stricter)."""
    code, match, ops = _compile(programs, one_lane)
    p = len(code)
    pc, done, active = [0] * p, set(), set()
    lanes: Dict[Tuple[int, Hashable], deque] = {}
    lane_of: Dict[Tuple[int, int], Tuple[int, Hashable]] = {}
    progressed = True
    while progressed:
        progressed = False
        for s in range(p):
            while pc[s] < len(code[s]):
                kind, lane, batch = code[s][pc[s]]
                if kind == "wait" and not all(op_id in done for op_id in batch):
                    break
                if kind == "post":
                    queue = lanes.setdefault((s, lane), deque())
                    queue.append(batch)
                    lane_of.update((op_id, (s, lane)) for op_id in batch)
                    if len(queue) == 1:
                        active.update(batch)
                pc[s] += 1
                progressed = True
        completed = [op_id for op_id in active if match[op_id] in active]
        done.update(completed)
        active.difference_update(completed)
        for key in {lane_of[op_id] for op_id in completed}:
            queue = lanes[key]
            while queue and all(op_id in done for op_id in queue[0]):
                queue.popleft()
                if queue:
                    active.update(queue[0])
        progressed = progressed or bool(completed)
    stuck = []
    for s in range(p):
        pending = [
            op_id for queue in (q for (t, _), q in lanes.items() if t == s) for batch in queue for op_id in batch
        ]
        pending = [op_id for op_id in pending if op_id not in done]
        if pc[s] < len(code[s]) or pending:
            how = "blocks on" if pc[s] < len(code[s]) else "ends with"
            waited = code[s][pc[s]][2] if pc[s] < len(code[s]) else pending
            names = [f"{ops[i]}{'' if i in active else ' (queued)'}" for i in waited if i not in done]
            stuck.append(f"stage {s} {how} " + "; ".join(names))
    if stuck:
        raise ValueError("communication deadlocks under NCCL's rendezvous rule: " + " | ".join(stuck))


def _compile(programs, one_lane):
    """Every stage's steps as ("post", lane, op ids) and ("wait", None, op ids); op ids
    (stage, n) count in issue order. Pairs every send with the receive of the same rank in
    issue order between its two stages."""
    code, ops = [], {}
    sends: Dict[Tuple[int, int], list] = {}
    recvs: Dict[Tuple[int, int], list] = {}
    for s, program in enumerate(programs):
        ids: Dict[Op, Tuple[int, int]] = {}
        code.append([])
        for step in program:
            if isinstance(step, Wait):
                missing = [op for op in step.ops if op not in ids]
                if missing:
                    raise ValueError(f"stage {s} waits on {missing[0]} before posting it")
                code[s].append(("wait", None, tuple(ids[op] for op in step.ops)))
                continue
            batch = []
            for op in step.ops:
                if op in ids:
                    raise ValueError(f"stage {s} posts {op} twice")
                op_id = ids[op] = (s, len(ids))
                ops[op_id] = op
                pair = (s, op.peer) if op.send else (op.peer, s)
                (sends if op.send else recvs).setdefault(pair, []).append(op_id)
                batch.append(op_id)
            if batch:
                code[s].append(("post", "stage" if one_lane else step.lane, tuple(batch)))
    match = {}
    for pair in sorted(set(sends) | set(recvs)):
        out, into = sends.get(pair, []), recvs.get(pair, [])
        for a, b in zip(out, into):
            if ops[a].message != ops[b].message:
                raise ValueError(f"stage {pair[0]}'s {ops[a]} meets stage {pair[1]}'s {ops[b]}")
            match[a], match[b] = b, a
        if len(out) != len(into):
            raise ValueError(
                f"stage {pair[0]} sends {len(out)} messages to stage {pair[1]}, which receives {len(into)}"
            )
    return code, match, ops


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
    (activation or gradient) has been produced. Per-stage costs (with chunks: per stage, or
    per virtual stage when longer than the plan); `exit_cost` is added to every backward of
    a stage that owns exits (its heads run just before backward)."""
    p = len(plan)
    exit_cost = exit_cost or [0.0] * p

    def cost_of(costs, a, s):
        return costs[a.virtual_stage(s)] if len(costs) > p else costs[s]

    done: Dict[Tuple[str, Item, int], float] = {}
    held: List[List[Tuple[str, Item, int]]] = [[] for _ in range(p)]  # outputs sent at their step's end
    pos = [0] * p
    clock = [0.0] * p
    spans: List[List[Tuple[float, float, Action]]] = [[] for _ in range(p)]
    progressed = True
    while progressed:
        progressed = False
        for s in range(p):
            while pos[s] < len(plan[s]):
                a = plan[s][pos[s]]
                u = a.virtual_stage(s)
                if a.recv:
                    src = ("F", a.item, u - 1) if a.kind == "F" else ("B", a.item, u + 1)
                    if src not in done:
                        break
                    ready = done[src]
                else:
                    ready = 0.0
                if a.kind == "F":
                    cost = cost_of(forward_cost, a, s)
                else:
                    cost = cost_of(backward_cost, a, s) + cost_of(exit_cost, a, s)
                start = max(clock[s], ready)
                clock[s] = start + cost
                held[s].append((a.kind, a.item, u))
                spans[s].append((start, clock[s], a))
                pos[s] += 1
                if pos[s] == len(plan[s]) or not plan[s][pos[s]].with_previous:
                    done.update((key, clock[s]) for key in held[s])
                    held[s] = []
                progressed = True
    stuck = [s for s in range(p) if pos[s] < len(plan[s])]
    if stuck:
        raise ValueError(f"plan deadlocks: stages {stuck} wait forever at {[str(plan[s][pos[s]]) for s in stuck]}")
    return Timeline(spans, max(clock))
