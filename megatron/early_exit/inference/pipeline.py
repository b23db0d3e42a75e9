"""Pipeline-based early exit (EE-LLM) for a model split into pipeline stages.

Every stage keeps the KV cache of its own layers and runs every row through them (the
stage's `Decoder.run_stage`), so the K/V of a token that left early are those full-depth
decoding would have written: the stages after its exit finish them while the first stage
already works on the next token. One step, as a timeline:

    stage 0    embed + layers (+ its exits) ─► send hidden on ─► tokens known? next step : wait for them
    stage k    recv hidden ─► layers; an exit decides rows not yet decided ─► send decisions to stage 0
                                                                         └─► send hidden on (KV completion)
    last       ... its final layer decides every row still open

Decisions travel straight to stage 0 (per stage per step, the decided rows' indices and
depths, then their logits when there are any), which samples, applies stop tokens and
budgets exactly as `generate` does, and tells the stages which rows take part in the next
step. Stage 0 waits only for the decisions it needs, so it runs ahead of the later stages.

Messages keep NCCL's rendezvous rule (a send completes once its peer posts the matching
receive; a pair's ops match in issue order, on one stream): every link carries its
messages in the same order on both sides (`lead_order`, `follow_order`, replayed by
tests/test_nccl_rule.py through `plan.check_rendezvous`), and each stage waits for its
sends of steps before the previous one, so what is in flight stays bounded. With one stage
this is the same method without the overlap (the reference a pipeline run must reproduce).

This file is the protocol only: the stage's computation is decoder.py's, the posting and
waiting of messages pipeline/p2p.py's `Transport`; `_Links` frames the messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from torch import Tensor

from megatron.early_exit.inference.decoder import FULL_DEPTH, Decision, Decoder, StepOutput
from megatron.early_exit.inference.layers import to_device
from megatron.early_exit.inference.result import GenerationResult, Transcript, clock
from megatron.early_exit.pipeline.p2p import Transport
from megatron.early_exit.pipeline.plan import Op, Post, Wait

STEP, STOP = 1, 0
# Message tags of their own, so that nothing else sent between the same ranks can be taken
# for a step or a decision.
STEP_TAG, DECISION_TAG = 7101, 7102


# ---------------------------------------------------------------------------
# The message protocol, as pure coroutines: they yield what to post and wait for, and
# `_drive` performs it (tests replay the same coroutines through plan.check_rendezvous).
# Messages: ("step", t) header and ("hidden", t) go stage k -> k+1; ("decision", t) (rows
# and depths) and, when the stage decided rows, ("logits", t) go stage k -> 0.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Compute:
    """Run step `step` here. Stage 0 answers whether there was a step; a later stage, how
    many rows it decided."""

    step: int


@dataclass(frozen=True)
class Undecided:
    """Stage 0 asks whether rows of `step` still wait for a decision."""

    step: int


def _send(op: Op):
    # Plain isend/irecv: NCCL gives each pair of ranks its own stream, unless the process
    # group was initialised eagerly (then one stream for all); the tests replay both.
    yield Post((op,), lane=op.peer)


def _recv(op: Op):
    """Post and wait; answers what the driver read from the message."""
    yield Post((op,), lane=op.peer)
    return (yield Wait((op,)))


def _take(consumed: List[int], upto: Dict[int, int]):
    """Take stage k's decision messages up to step upto[k], for every k, by diagonal step + k:
    stage k sends step s's decisions before it takes step s + 1, which stage k - 1 passes on
    only after its own decisions of step s + 1, so on one stream per stage a message of a lower
    diagonal always comes first."""
    due = sorted((step + k, k, step) for k, last in upto.items() for step in range(consumed[k], last + 1))
    for _, k, step in due:
        rows = yield from _recv(Op(False, k, ("decision", step)))
        if rows:  # logits only when the stage decided rows
            yield from _recv(Op(False, k, ("logits", step)))
        consumed[k] = step + 1


def lead_order(num_stages: int):
    """Stage 0. It waits only for the decisions it needs, earliest stage first, so it runs
    ahead of the later stages, within bounds that keep NCCL from waiting in a circle: before
    step t goes out, stage k's decisions up to step t - k are taken (stage k sent them before
    it could pass on what lets stage 1 take step t); before stage j's decisions of step t,
    those of a later stage i up to step t + j - i - 1."""
    p, consumed, t, in_flight = num_stages, [0] * num_stages, 0, ()
    while True:
        more = yield Compute(t)
        if p > 1:
            yield from _take(consumed, {k: t - k for k in range(1, p)})
            if in_flight:
                yield Wait(in_flight)  # stage 1 took them before answering
            in_flight = tuple(Op(True, 1, (kind, t)) for kind in (("step", "hidden") if more else ("step",)))
            for op in in_flight:
                yield from _send(op)
        if not more:  # ("step", t) was the stop
            break
        for j in range(1, p):
            if not (yield Undecided(t)):
                break
            yield from _take(consumed, {i: t if i <= j else t + j - i - 1 for i in range(1, p)})
        t += 1
    yield from _take(consumed, {k: t - 1 for k in range(1, p)})
    if in_flight:
        yield Wait(in_flight)


def follow_order(stage: int, num_stages: int):
    """A later stage: each step in, its decisions to stage 0 and the step on. What it keeps in
    flight is bounded: before sending step t it waits for its steps before t - 1 (the next
    stage took them) and its decisions up to step t - stage (stage 0 took them before
    sending step t, see `lead_order`), so neither wait can close a circle."""
    last, t = stage == num_stages - 1, 0
    sent: Dict[Op, int] = {}  # send in flight -> the step after which it is waited for
    while (yield from _recv(Op(False, stage - 1, ("step", t)))):  # answers False for the stop
        yield from _recv(Op(False, stage - 1, ("hidden", t)))
        rows = yield Compute(t)
        old = tuple(op for op, due in sent.items() if due <= t)
        if old:
            yield Wait(old)
            for op in old:
                del sent[op]
        ops = [Op(True, 0, ("decision", t))] + ([Op(True, 0, ("logits", t))] if rows else [])
        for op in ops:
            sent[op] = t + stage
        if not last:
            for kind in ("step", "hidden"):
                ops.append(Op(True, stage + 1, (kind, t)))
                sent[ops[-1]] = t + 2
        for op in ops:
            yield from _send(op)
        t += 1
    if not last:
        stop = Op(True, stage + 1, ("step", t))
        yield from _send(stop)
        sent[stop] = t
    if sent:
        yield Wait(tuple(sent))


def _drive(order, links: "_Links", compute, undecided=None) -> None:
    """Perform a protocol coroutine's requests with real messages."""
    answer = None
    while True:
        try:
            request = order.send(answer)
        except StopIteration:
            return
        if isinstance(request, Post):
            answer = links.post(request.ops[0])
        elif isinstance(request, Wait):
            answer = links.wait(request.ops)
        elif isinstance(request, Compute):
            answer = compute(request.step)
        else:
            answer = undecided(request.step)


class _Links:
    """The framing of one pipeline's messages (same TP rank on every stage): headers and
    buffers by message kind, over a `Transport`. Sends take their tensor from `outbox`;
    waited receives leave what they carry in `inbox`, by (peer, message)."""

    def __init__(self, max_batch: int, vocab: int, hidden_size: int, dtype, device):
        self.stage = parallel_state.get_pipeline_model_parallel_rank()
        self.num_stages = parallel_state.get_pipeline_model_parallel_world_size()
        self.first_rank = parallel_state.get_pipeline_model_parallel_first_rank()
        self.ranks = torch.distributed.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
        self.max_batch, self.vocab, self.hidden_size, self.dtype, self.device = (
            max_batch,
            vocab,
            hidden_size,
            dtype,
            device,
        )
        # Plain isend/irecv, one op per post, on the default group: each peer its own stream.
        self.transport = Transport(self.ranks, batched=False)
        self.outbox: Dict[tuple, Tensor] = {}
        self.inbox: Dict[tuple, object] = {}

    @property
    def pending(self) -> int:
        """Messages posted and not yet waited for."""
        return self.transport.in_flight

    @property
    def peak(self) -> int:
        """Most messages ever in flight at once."""
        return self.transport.peak

    def post(self, op: Op) -> None:
        tag = STEP_TAG if op.message[0] in ("step", "hidden") else DECISION_TAG
        tensor = self.outbox.pop(op.message) if op.send else self._buffer(op)
        self.transport.post((op,), (tensor,), tag)

    def _buffer(self, op: Op) -> Tensor:
        kind, step = op.message
        b, device = self.max_batch, self.device
        if kind == "step":
            return torch.empty(3 + 4 * b, dtype=torch.int64, device=device)
        if kind == "decision":
            return torch.empty(1 + 2 * b, dtype=torch.int64, device=device)
        if kind == "hidden":
            rows, width = self.inbox[(op.peer, ("step", step))][::4]
            return torch.empty(width, len(rows), self.hidden_size, dtype=self.dtype, device=device)
        return torch.empty(
            len(self.inbox[(op.peer, ("decision", step))][0]), self.vocab, dtype=torch.float32, device=device
        )

    def wait(self, ops) -> Optional[object]:
        """Wait for `ops`; for a header, answer what the protocol branches on."""
        answer, tensors = None, self.transport.wait(ops)
        for op in ops:
            if not op.send:
                answer = self._read(op, tensors[op])
        return answer

    def _read(self, op: Op, tensor: Tensor):
        kind, step = op.message
        b = self.max_batch
        if kind in ("hidden", "logits"):
            self.inbox[(op.peer, op.message)] = tensor
            return None
        if kind == "decision":
            n = int(tensor[0])
            self.inbox[(op.peer, op.message)] = tuple(tensor[1 + j * b : 1 + j * b + n].tolist() for j in range(2))
            return n
        code, n, width = tensor[:3].tolist()
        if code == STOP:
            if self.stage < self.num_stages - 1:
                self.outbox[("step", step)] = tensor  # forwarded as it came
            return False
        rows, starts, ends, open_rows = (tensor[3 + j * b : 3 + j * b + n].tolist() for j in range(4))
        self.inbox[(op.peer, op.message)] = (rows, starts, ends, [bool(o) for o in open_rows], width)
        return True

    def put_step(self, step: int, kind: int, rows, starts, ends, open_rows, hidden: Optional[Tensor]) -> None:
        b = self.max_batch
        header = [kind, len(rows), 0 if hidden is None else hidden.shape[0]]
        for values in (rows, starts, ends, [int(o) for o in open_rows]):
            header += list(values) + [-1] * (b - len(values))
        self.outbox[("step", step)] = to_device(self.device, header)[0]  # pinned, non-blocking on CUDA
        if hidden is not None:
            self.outbox[("hidden", step)] = hidden.contiguous()

    def put_decisions(self, step: int, decided: Dict[int, Decision]) -> int:
        """Only the decided rows travel: their indices and depths, then their logits."""
        b, rows = self.max_batch, sorted(decided)
        padding = [0] * (b - len(rows))
        header = [len(rows)] + rows + padding + [decided[r][0] for r in rows] + padding
        self.outbox[("decision", step)] = to_device(self.device, header)[0]  # pinned, non-blocking on CUDA
        if rows:
            self.outbox[("logits", step)] = torch.stack(
                [decided[r][1][: self.vocab].float() for r in rows]
            ).contiguous()
        return len(rows)


def pipeline_generate(
    model,
    prompts: List[List[int]],
    max_new_tokens: int,
    sampling,
    stop_tokens,
    strategy,
    exit_layers: Optional[List[int]],
    threshold: float,
    measure,
    top_n: int = 0,
    on_tokens=None,
    exit_thresholds: Optional[Dict[int, float]] = None,
) -> GenerationResult:
    """Pipeline-based early exit over this rank's stage; every rank returns the result.
    `exit_thresholds` (by --exit-layer-nums entry) override `threshold` at those exits."""
    decoder = Decoder(model, len(prompts), max(len(p) for p in prompts) + max_new_tokens)
    policy = decoder.exit_policy(exit_layers, threshold, measure, exit_thresholds)
    links = _Links(len(prompts), model.vocab_size, decoder.hidden_size, decoder.dtype, decoder.device)
    result = GenerationResult(
        [[] for _ in prompts],
        [[] for _ in prompts],
        [[] for _ in prompts],
        num_layers=model.config.num_layers,
        strategy=strategy,
    )
    if decoder.first:
        start = clock(decoder.device)
        transcript = Transcript(
            result,
            max_new_tokens,
            frozenset(int(t) for t in stop_tokens),
            sampling,
            sampling.make_generators(decoder.device, len(prompts)),
            active=list(range(len(prompts))),
            top_n=top_n,
            on_tokens=on_tokens,
            previous=[p[-1] for p in prompts],
        )
        lead = _Lead(decoder, policy, links, transcript, prompts, start)
        _drive(lead_order(links.num_stages), links, lead.compute, lead.undecided)
    else:
        _drive(follow_order(links.stage, links.num_stages), links, partial(_follow_step, decoder, policy, links))
    if links.num_stages > 1:  # every rank returns the same result
        holder = [result]
        torch.distributed.broadcast_object_list(
            holder, links.first_rank, group=parallel_state.get_pipeline_model_parallel_group()
        )
        result = holder[0]
    return result


class _Lead:
    """Stage 0's side of each step: runs it, collects its decisions, picks the tokens."""

    def __init__(self, decoder: Decoder, policy, links: _Links, transcript: Transcript, prompts, start: float):
        self.decoder, self.policy, self.links = decoder, policy, links
        self.transcript, self.prompts, self.start = transcript, prompts, start
        self.rows: List[int] = []
        self.decided: Dict[int, Decision] = {}
        self.step = -1

    def compute(self, step: int) -> bool:
        result, device = self.transcript.result, self.decoder.device
        if step > 0:
            self._collect()
            rows, decided = self.rows, self.decided
            self.transcript.take(
                StepOutput(rows, [decided[r][0] for r in rows], torch.stack([decided[r][1] for r in rows]))
            )
            if step == 1:
                result.prefill_seconds = clock(device) - self.start
            else:
                result.num_steps += 1
        if not self.transcript.active:
            result.decode_seconds = clock(device) - self.start - result.prefill_seconds
            if self.links.num_stages > 1:
                self.links.put_step(step, STOP, [], [], [], [], None)
            return False
        rows = list(self.transcript.active)
        new = [list(self.prompts[r]) if step == 0 else [self.transcript.last_token(r)] for r in rows]
        starts, ends = self.decoder.feed(rows, new)
        policy = self.policy if step > 0 else FULL_DEPTH  # the prefill: full depth
        hidden, decided = self.decoder.run_stage(new, rows, starts, ends, [True] * len(rows), policy)
        if self.links.num_stages > 1:
            self.links.put_step(step, STEP, rows, starts, ends, [r not in decided for r in rows], hidden)
        self.rows, self.decided, self.step = rows, decided, step
        return True

    def undecided(self, step: int) -> bool:
        self._collect()
        return len(self.decided) < len(self.rows)

    def _collect(self) -> None:
        """Merge the decision messages received so far; those of earlier steps are empty (no
        row was open on their stage by then)."""
        inbox = self.links.inbox
        for key in [k for k in inbox if k[1][0] == "decision"]:
            peer, (_, step) = key
            rows, depths = inbox[key]
            if rows and (peer, ("logits", step)) not in inbox:
                continue  # its logits are still to come
            del inbox[key]
            logits = inbox.pop((peer, ("logits", step)), None)
            if rows and step != self.step:
                raise RuntimeError(f"stage {peer} decided rows of step {step} after stage 0 had moved on")
            for i, (row, depth) in enumerate(zip(rows, depths)):
                self.decided[row] = (depth, logits[i])


def _follow_step(decoder: Decoder, policy, links: _Links, step: int) -> int:
    """A later stage's step: its layers for every row, decisions for the rows still open."""
    rows, starts, ends, open_rows, _ = links.inbox.pop((links.stage - 1, ("step", step)))
    hidden = links.inbox.pop((links.stage - 1, ("hidden", step)))
    hidden, decided = decoder.run_stage(hidden, rows, starts, ends, open_rows, policy if step > 0 else FULL_DEPTH)
    if not decoder.last:
        links.put_step(
            step, STEP, rows, starts, ends, [o and r not in decided for r, o in zip(rows, open_rows)], hidden
        )
    return links.put_decisions(step, decided)
