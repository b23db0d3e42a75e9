"""Continuous batching: one engine owns a pool of KV-cache slots and the running sequences.

    engine = Engine(model, max_batch_size=16, max_context=1024)
    seq = engine.add(SequenceRequest(prompt, EarlyExit(0.8), SamplingParams(), max_new_tokens=64))
    while engine.has_work:
        for event in engine.step():   # one token for every running sequence
            ...                       # TokenEvents: row = the sequence's id

A step advances every running sequence by one token and feeds new sequences a bounded
slice of their prompts (`prefill_chunk` tokens in all), so a long prompt never stalls the
others: all of it is one `Decoder.step` over the slots of the pool, each row with its own
exit policy. Rows leave at their own exits inside the step; the rows going on run the
deeper layers as a compacted group (index lists into the pool, no copy of the cache), and
the rows that left get their deeper K/V from their strategy (recomputation by a later
pass, or propagation at once), as in `generate`. A sequence leaves the batch the moment
it finishes (budget, stop token, abort) and its slot is reused at the next step.

Rank 0 plans each step (`plan`: which waiting sequences join, which leave by abort) and
every tensor-parallel rank executes the same plan (`execute`), so the ranks' engines stay
identical without other communication: the logits are gathered on every rank and each
sequence samples from its own seeded generator. Token events are emitted on every rank;
only rank 0 has listeners for them.
"""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from megatron.early_exit.inference.context import inference_context
from megatron.early_exit.inference.decoder import FULL_DEPTH, Decoder, ExitPolicy
from megatron.early_exit.inference.errors import InferenceConfigError
from megatron.early_exit.inference.layers import to_device
from megatron.early_exit.inference.prompts import check_prompts
from megatron.early_exit.inference.result import GenerationResult, TokenEvent
from megatron.early_exit.inference.sampling import SamplingParams, select_tokens, top_alternatives
from megatron.early_exit.inference.strategies import FullDepth

DEFAULT_PREFILL_CHUNK = 256
# "none": the rows going on past an exit run the deeper layers at once. "drex" (DREX, arXiv
# 2512.15705): fewer than half the decoding rows going on past an exit wait there, up to
# `max_wait` steps per token, to run the deeper layers with a later step's rows
# (benchmarks/engine_batching.py compares them).
REGROUPING = ("none", "drex")

Listener = Callable[[TokenEvent, "Sequence"], None]


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (the server answers 503)."""


@dataclass(frozen=True)
class SequenceRequest:
    """One prompt to continue: what `generate` takes for one row."""

    prompt: Tuple[int, ...]
    strategy: object = FullDepth()
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = 32
    stop_tokens: Tuple[int, ...] = ()
    top_n: int = 0


@dataclass
class Sequence:
    """A sequence's state in the engine (the same on every rank)."""

    seq_id: int
    request: SequenceRequest
    slot: int = -1
    policy: ExitPolicy = FULL_DEPTH
    generator: Optional[torch.Generator] = None
    num_fed: int = 0  # prompt tokens fed to the decoder
    parked_at: Optional[int] = None  # regrouping: the exit depth its newest token waits at
    waited: int = 0  # regrouping: steps its newest token has waited
    result: GenerationResult = None
    finish_reason: Optional[str] = None  # "stop", "length" or "abort"

    @property
    def prefilling(self) -> bool:
        return self.num_fed < len(self.request.prompt)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def previous_token(self) -> int:
        tokens = self.result.tokens[0]
        return tokens[-1] if tokens else self.request.prompt[-1]


@dataclass
class StepPlan:
    """What rank 0 decided for a step, executed alike on every rank."""

    admit: List[Tuple[int, SequenceRequest]] = field(default_factory=list)
    abort: List[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.admit or self.abort)


class Engine:
    def __init__(
        self,
        model,
        max_batch_size: int,
        max_context: int,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        max_waiting: Optional[int] = None,
        regroup: str = "none",
        max_wait: int = 1,
    ):
        if not (model.pre_process and model.post_process):
            raise InferenceConfigError(
                "continuous batching needs the whole model on one stage (--pipeline-model-parallel-size 1)"
            )
        if max_context > model.max_sequence_length:
            raise InferenceConfigError(
                f"max_context {max_context} exceeds the model's maximum sequence length {model.max_sequence_length}"
            )
        if regroup not in REGROUPING:
            raise InferenceConfigError(f"regroup must be one of {REGROUPING}, got {regroup!r}")
        if max_wait < 1:
            raise InferenceConfigError(f"max_wait must be >= 1, got {max_wait}")
        if prefill_chunk < 1:
            raise InferenceConfigError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.max_batch_size, self.max_context = model, max_batch_size, max_context
        self.prefill_chunk, self.max_waiting, self.regroup = prefill_chunk, max_waiting, regroup
        self.max_wait = max_wait
        with inference_context(model):
            self.decoder = Decoder(model, max_batch_size, max_context)
        self.running: Dict[int, Sequence] = {}  # by id, in order of admission
        self.free_slots: List[int] = list(range(max_batch_size))
        self.num_steps = 0
        self.num_parked = 0  # regrouping: tokens that waited a step at an exit
        self.longest_wait = 0  # regrouping: the most steps a token waited
        self._policies: Dict[object, ExitPolicy] = {}
        # Rank 0's side, shared with the threads that add and abort.
        self._lock = threading.Lock()
        self._waiting: Deque[Tuple[int, SequenceRequest]] = collections.deque()
        self._aborted: set = set()
        self._ids = itertools.count()
        self.listeners: Dict[int, Listener] = {}

    # -- rank 0: requests in ----------------------------------------------------------------

    def check(self, request: SequenceRequest) -> None:
        """Refuses what the engine cannot run (InferenceConfigError naming the field)."""
        if not 0 <= request.top_n <= self.model.vocab_size:
            raise InferenceConfigError(f"top_n must be in [0, {self.model.vocab_size}], got {request.top_n}")
        check_prompts(
            [request.prompt],
            request.max_new_tokens,
            self.model.vocab_size,
            self.max_context,
            prompt_field="prompt",
            context_name="the engine's context per slot",
        )
        request.strategy.check(request.sampling)
        self.policy_of(request.strategy)

    def add(self, request: SequenceRequest, listener: Optional[Listener] = None) -> int:
        """Queue a sequence (its id: the `row` of its TokenEvents); it joins at a coming step.
        `listener(event, sequence)` hears its tokens as they are picked, and its end (a
        finished event, the sequence's `result` and `finish_reason` complete)."""
        self.check(request)
        with self._lock:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(
                    f"{len(self._waiting)} sequences are waiting (--max-queued-requests {self.max_waiting})"
                )
            seq_id = next(self._ids)
            if listener is not None:
                self.listeners[seq_id] = listener
            self._waiting.append((seq_id, request))
        return seq_id

    def abort(self, seq_id: int) -> None:
        """Stop a sequence: a waiting one never runs, a running one leaves at the next step."""
        with self._lock:
            self._aborted.add(seq_id)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self._waiting or self._aborted)

    def plan(self) -> StepPlan:
        """Rank 0: the aborts to apply, and the waiting sequences that take the free slots."""
        plan = StepPlan()
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            kept = collections.deque()
            for seq_id, request in self._waiting:
                if seq_id in aborted:
                    self._emit_abort(seq_id, request)
                else:
                    kept.append((seq_id, request))
            self._waiting = kept
            plan.abort = sorted(s for s in aborted if s in self.running)
            free = len(self.free_slots) + len(plan.abort)
            while self._waiting and free > 0:
                plan.admit.append(self._waiting.popleft())
                free -= 1
        return plan

    def step(self) -> List[TokenEvent]:
        """plan() and execute() on one process."""
        return self.execute(self.plan())

    # -- every rank: the step -----------------------------------------------------------------

    def execute(self, plan: StepPlan) -> List[TokenEvent]:
        events = []
        for seq_id in plan.abort:
            seq = self.running[seq_id]
            seq.finish_reason = "abort"
            events.append(self._release(seq, []))
        for seq_id, request in plan.admit:
            self._admit(seq_id, request)
        if not self.running:
            return self._deliver(events)
        rows, new_tokens, policies, resume, producing = self._batch()
        # At most half the decoding rows wait; a token waits at most max_wait steps.
        park_below = (len(rows) + len(resume)) // 2 + 1 if self.regroup == "drex" else 0
        rewait = {seq.slot for seq in producing if seq.parked_at is not None and seq.waited < self.max_wait}
        with inference_context(self.model):
            out = self.decoder.step(rows, new_tokens, policies, resume=resume, park_below=park_below, rewait=rewait)
        self.num_steps += 1
        self.num_parked += len(out.parked)
        for seq in producing:
            seq.parked_at = out.parked.get(seq.slot)
            seq.waited = 0 if seq.parked_at is None else seq.waited + 1
            self.longest_wait = max(self.longest_wait, seq.waited)
        producing = [seq for seq in producing if seq.parked_at is None]
        index = {r: i for i, r in enumerate(out.rows)}
        cols = [index[seq.slot] for seq in producing]
        events += self._take(producing, [out.depths[c] for c in cols], self._rows_of(out.logits, cols))
        return self._deliver(events)

    def _batch(self):
        """The step's rows: every decoding sequence's newest token (or, parked at an exit in
        the previous step, its resumption there), then prompts in order of arrival within
        the step's budget. Returns (rows, new tokens, policies, resumed, sequences producing)."""
        rows, new_tokens, policies, resume, producing = [], [], [], [], []
        for seq in sorted(self.running.values(), key=lambda s: s.slot):
            if seq.parked_at is not None:
                resume.append((seq.slot, seq.parked_at, seq.policy))
                producing.append(seq)
            elif not seq.prefilling:
                rows.append(seq.slot), new_tokens.append([seq.previous_token()]), policies.append(seq.policy)
                producing.append(seq)
        budget = self.prefill_chunk
        for seq in self.running.values():
            if seq.prefilling and budget > 0:
                n = min(len(seq.request.prompt) - seq.num_fed, budget)
                rows.append(seq.slot), new_tokens.append(list(seq.request.prompt[seq.num_fed : seq.num_fed + n]))
                policies.append(FULL_DEPTH)  # the prompt and its first token: full depth, as in generate
                seq.num_fed += n
                budget -= n
                if not seq.prefilling:
                    producing.append(seq)
        return rows, new_tokens, policies, resume, producing

    def reset(self) -> List[Sequence]:
        """After a step failed: every running sequence leaves (returned, finish_reason
        "error"), every slot is free; the waiting ones stay. The same on every rank."""
        dropped = list(self.running.values())
        for seq in dropped:
            seq.finish_reason = "error"
            self.listeners.pop(seq.seq_id, None)
        self.running.clear()
        self.free_slots = list(range(self.max_batch_size))
        return dropped

    def _admit(self, seq_id: int, request: SequenceRequest) -> None:
        slot = self.free_slots.pop(0)
        self.decoder.crop(slot, 0)  # the slot's previous sequence is forgotten
        self.running[seq_id] = Sequence(
            seq_id,
            request,
            slot,
            self.policy_of(request.strategy),
            request.sampling.make_generator(self.decoder.device),
            result=self._empty_result(request),
        )

    def _empty_result(self, request: SequenceRequest) -> GenerationResult:
        result = GenerationResult(
            [[]], [[]], [[]], num_layers=self.model.config.num_layers, strategy=request.strategy.name
        )
        if request.top_n > 0:
            result.top_tokens, result.top_logprobs = [[]], [[]]
        return result

    def policy_of(self, strategy) -> ExitPolicy:
        """The strategy's exit policy on this decoder (built once per strategy)."""
        if strategy not in self._policies:
            if not strategy.batchable:
                raise InferenceConfigError(
                    f"{strategy.name} decoding does not run in the continuous batch "
                    "(it needs its own lane: static batching)"
                )
            self._policies[strategy] = strategy.exit_policy(self.decoder)  # safe off the decoding thread: no tensor
        return self._policies[strategy]

    def _take(self, seqs: List[Sequence], depths: List[int], logits) -> List[Tuple[TokenEvent, Sequence]]:
        """Each sequence's token from its row of `logits` [b, V], chosen as generate would."""
        if not seqs:
            return []
        vocab = logits.shape[-1]
        plain = [i for i, s in enumerate(seqs) if s.request.sampling.greedy and not s.request.sampling.ban_after]
        tokens, logprobs = [None] * len(seqs), [None] * len(seqs)
        if plain:  # greedy rows together: a row's argmax and log-softmax do not depend on the others
            t, lp = select_tokens(self._rows_of(logits, plain), SamplingParams(), None)
            for j, i in enumerate(plain):
                tokens[i], logprobs[i] = t[j : j + 1], lp[j : j + 1]
        for i, seq in enumerate(seqs):
            if tokens[i] is None:  # each with its own generator, on its own row (as alone)
                sampling = seq.request.sampling
                banned = sampling.banned([seq.previous_token()], vocab, logits.device)
                tokens[i], logprobs[i] = select_tokens(logits[i : i + 1], sampling, seq.generator, banned)
        columns = [torch.cat(tokens).double().unsqueeze(-1), torch.cat(logprobs).double().unsqueeze(-1)]
        top_n = max(s.request.top_n for s in seqs)
        if top_n > 0:
            columns += [t.double() for t in top_alternatives(logits, top_n)]
        values = torch.cat(columns, dim=-1).tolist()  # one read of the device per step
        events = []
        for seq, depth, row in zip(seqs, depths, values):
            res, n = seq.result, seq.request.top_n
            token = int(row[0])
            res.tokens[0].append(token)
            res.exit_layers[0].append(depth)
            res.logprobs[0].append(row[1])
            if n > 0:
                res.top_tokens[0].append([int(t) for t in row[2 : 2 + n]])
                res.top_logprobs[0].append(row[2 + top_n : 2 + top_n + n])
            if token in seq.request.stop_tokens:
                seq.finish_reason = "stop"
            elif len(res.tokens[0]) >= seq.request.max_new_tokens:
                seq.finish_reason = "length"
            events.append(self._release(seq, [len(res.tokens[0]) - 1]) if seq.finished else self._event(seq, [-1]))
        return events

    def _rows_of(self, t: Tensor, cols: List[int]) -> Optional[Tensor]:
        """Rows `cols` of `t` [b, ...], selected on the device (a list index would wait for it)."""
        if not cols:
            return None
        if cols == list(range(t.shape[0])):
            return t
        return t.index_select(0, to_device(t.device, cols)[0])

    def _event(self, seq: Sequence, at: List[int]) -> Tuple[TokenEvent, Sequence]:
        res = seq.result
        top = (
            ([res.top_tokens[0][i] for i in at], [res.top_logprobs[0][i] for i in at])
            if seq.request.top_n
            else (None, None)
        )
        return TokenEvent(
            seq.seq_id,
            [res.tokens[0][i] for i in at],
            [res.exit_layers[0][i] for i in at],
            [res.logprobs[0][i] for i in at],
            *top,
            finished=seq.finished,
        ), seq

    def _release(self, seq: Sequence, at: List[int]) -> Tuple[TokenEvent, Sequence]:
        """A finished sequence leaves the batch; its slot is free for the next step."""
        del self.running[seq.seq_id]
        self.free_slots.append(seq.slot)
        self.free_slots.sort()
        return self._event(seq, at)

    def _emit_abort(self, seq_id: int, request: SequenceRequest) -> None:
        """A waiting sequence aborted before it ran (rank 0 only: it was never planned)."""
        seq = Sequence(seq_id, request, result=self._empty_result(request), finish_reason="abort")
        self._deliver([self._event(seq, [])])

    def _deliver(self, events: List[Tuple[TokenEvent, Sequence]]) -> List[TokenEvent]:
        """Hand each event to its sequence's listener (rank 0), as listener(event, sequence)."""
        for event, seq in events:
            listener = self.listeners.get(event.row)
            if listener is not None:
                if event.finished:
                    del self.listeners[event.row]
                listener(event, seq)
        return [event for event, _ in events]
