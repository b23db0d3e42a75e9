"""The decoder: this rank's pipeline stage of the model over its own KV cache.

It is built for one stage; with PP=1 that stage is the whole model. The first stage
embeds the new tokens, the last owns the final norm and output layer, and the layers keep
their global numbers (`layer.layer_number`), so on every stage an exit is named by its
--exit-layer-nums entry (`exit_points`) and fires at a global depth (`ExitPolicy.exits`).
Two passes share the cache, the work sets, the embedding and the exit test:

`step()` (the whole model on one stage) feeds each row's new tokens layer by layer,
stopping rows at exits. Its work at layer i is, for every row still going, the positions
from the cache's valid length at that layer up to the row's newest token. Usually that is
just the newest token; after an early exit by recomputation it also holds the tokens that
left at a shallower exit and owe this layer its K/V (EE-LLM's recomputation, batched with
the current token). Their inputs wait in `frontier`: the hidden state of each position
after the deepest layer it went through. Rows decide independently: at an exit, the rows
whose confidence reaches the threshold take their token there and drop out of the batch
(an index_select on the batch dim), so deeper layers run only for the rows still going. A
row that left either owes its deeper K/V (recomputation) or has them filled at once from
its exit hidden state through each deeper layer's input norm and K/V projection (CALM's
state propagation).

`run_stage()` (pipeline-based early exit, pipeline.py) runs every row through every layer
of the stage, so the K/V of a token that left early are those full-depth decoding would
have written; an exit only decides the rows still open.

Positions and lengths live on the host, so a step issues no device sync except one per
active exit: skipping the deeper layers for some rows needs their decision there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from megatron.early_exit.inference.confidence import ConfidenceMeasure, ExitView
from megatron.early_exit.inference.errors import InferenceConfigError
from megatron.early_exit.inference.kv_cache import KVCache
from megatron.early_exit.inference.layers import (
    RotaryTables,
    WorkSet,
    attention_scale,
    block_exit_logits,
    build_work_set,
    embed,
    exit_logits,
    final_logits,
    project_qkv,
    run_layer,
    to_device,
)
from megatron.early_exit.inference.propagation import Propagators


@dataclass(frozen=True)
class ExitPoint:
    depth: int  # layers run before the head reads: the exit's layer, or one less with --pre-exit
    layer_number: int  # the exit's entry in --exit-layer-nums
    head: torch.nn.Module
    layer: Optional[torch.nn.Module]  # the exit's layer (an exit MLP uses its pre-MLP norm)


@dataclass(frozen=True)
class ExitPolicy:
    """Which exits may fire, and when. `threshold=-inf` fires the first exit always."""

    exits: Dict[int, ExitPoint] = field(default_factory=dict)  # depth -> exit
    threshold: float = math.inf
    measure: Optional[ConfidenceMeasure] = None
    propagate: bool = False  # CALM state propagation instead of recomputation
    per_exit: Dict[int, float] = field(default_factory=dict)  # depth -> threshold, overriding `threshold`

    def threshold_at(self, depth: int) -> float:
        return self.per_exit.get(depth, self.threshold)


FULL_DEPTH = ExitPolicy()

Decision = Tuple[int, Tensor]  # a row's newest token: (depth it left at, logits [vocab] float32)


@dataclass
class StepOutput:
    rows: List[int]  # the rows decided: those fed (less the parked), then those resumed
    depths: List[int]  # layers each row's newest token went through (num_layers: final)
    logits: Tensor  # [b, vocab] float32: the newest token's logits, from the layer it left at
    chunk_logits: Optional[List[Tensor]] = None  # all_logits: per row [n, vocab] of its last-layer chunk
    parked: Dict[int, int] = field(default_factory=dict)  # rows waiting at an exit (row -> depth), undecided


def validate_model(model) -> None:
    config = model.config
    unsupported = {
        "sequence parallelism (build the inference model without --sequence-parallel)": config.sequence_parallel,
        "multi-latent attention": config.multi_latent_attention,
        "mixture of experts": config.num_moe_experts is not None,
        "sliding-window attention": config.window_size is not None,
        "gated attention output": config.attention_output_gate,
        f"softmax_type {config.softmax_type!r}": config.softmax_type != "vanilla",
        f"position embedding {model.position_embedding_type!r}": model.position_embedding_type
        not in ("rope", "learned_absolute", "none"),
    }
    bad = [name for name, present in unsupported.items() if present]
    if bad:
        raise InferenceConfigError(f"the inference decoder does not support {', '.join(bad)}")


def head_logits(model, point: ExitPoint, hidden: Tensor, head_input: Optional[Tensor]) -> Tensor:
    """The exit's logits [c, b, V] from what the decoder hands it: the layer's output (and
    post-attention state for an exit MLP), or its block's output for an exit with a block."""
    if point.head.has_block:
        return block_exit_logits(model, point.head, hidden)
    return exit_logits(model, point.head, point.layer, hidden, head_input)


def fire_mask(model, point: ExitPoint, threshold: float, measure, last: Tensor, head_input, previous):
    """Which rows' newest token (last [1, b, h]) fires at `point`, on the device ([b] bool;
    None: every row, unread), and the exit's logits [b, V] when the measure projected them
    (valid at least for the rows that fire)."""
    if threshold == -math.inf:
        return None, None
    # A test from the hidden state alone decides here, before any vocabulary projection (its
    # decision comes back from the host: sent as a [b] bool tensor, no device read).
    if measure.decide is not None:
        return _on_device(measure.decide(point.layer_number, last[0], threshold), last), None
    likely = None if measure.prefilter is None else measure.prefilter(point.layer_number, last[0])
    if likely is not None and not any(likely):
        return _on_device(likely, last), None

    def project(rows: Optional[Tensor]) -> Tensor:
        hidden = last if rows is None else last.index_select(1, rows)
        sub_input = head_input if rows is None or head_input is None else head_input.index_select(1, rows)
        return head_logits(model, point, hidden, sub_input)[0]

    view = ExitView(point.layer_number, last[0], previous, project, likely=likely)
    return measure(view) >= threshold, view.projected()


def _on_device(decisions, like: Tensor) -> Tensor:
    return torch.tensor(list(decisions), dtype=torch.bool, device=like.device)


def confidence_test(model, point: ExitPoint, threshold: float, measure, last: Tensor, head_input, previous):
    """fire_mask read on the host: ([b] bools, logits or None); one device read."""
    mask, logits = fire_mask(model, point, threshold, measure, last, head_input, previous)
    return ([True] * last.shape[1] if mask is None else mask.tolist()), logits


class Decoder:
    """This rank's stage of an EarlyExitGPTModel (any TP) over a KV cache of `max_batch` rows."""

    def __init__(self, model, max_batch: int, max_seq: int):
        validate_model(model)
        self.model = model
        self.layers = list(model.decoder.layers)
        self.first, self.last = model.pre_process, model.post_process  # embeds; owns the output layer
        self.offset = self.layers[0].layer_number - 1  # layers on the stages before this one
        self.num_layers = model.config.num_layers  # the whole model's: the depth of a final decision
        attention = self.layers[0].self_attention
        # The stage's own weights, whatever the layer layout (Transformer Engine fuses the
        # input norm into linear_qkv, leaving input_layernorm without a weight).
        weight = next(self.layers[0].parameters())
        self.dtype, self.device = weight.dtype, weight.device
        self.hidden_size, self.vocab_size = model.config.hidden_size, model.vocab_size
        pre = model.ee_config.pre_exit
        # Exit blocks (--use-exit-block) attend over their own cache slots after the layers':
        # {depth: slot}. They run at every step, so that their K/V cover every position.
        self.exit_blocks = {
            int(num) - pre: len(self.layers) + i
            for i, num in enumerate(n for n, head in model.exits.items() if head.has_block)
        }
        self.cache = KVCache(
            len(self.layers) + len(self.exit_blocks),
            max_batch,
            max_seq,
            attention.num_query_groups_per_partition,
            attention.hidden_size_per_attention_head,
            self.dtype,
            self.device,
        )
        self.frontier = None  # step() only: the inputs owed to deeper layers
        if self.first and self.last:
            self.frontier = torch.zeros(max_batch, max_seq + 1, self.hidden_size, dtype=self.dtype, device=self.device)
        self.num_fed = [0] * max_batch  # positions whose token has been embedded, per row
        self.rotary = RotaryTables(model, max_seq, self.dtype) if model.position_embedding_type == "rope" else None
        self.scales = [attention_scale(layer) for layer in self.layers]
        self.propagators = Propagators(model, self.layers)
        # This stage's exits by --exit-layer-nums entry (its heads live with their layers).
        self.exit_points = {
            int(num): ExitPoint(int(num) - pre, int(num), head, self.layers[int(num) - 1 - self.offset])
            for num, head in model.exits.items()
        }

    def exit_policy(
        self,
        exit_layers: Optional[Sequence[int]],
        threshold: float,
        measure,
        exit_thresholds: Optional[Dict[int, float]] = None,
        propagate: bool = False,
    ) -> ExitPolicy:
        """The exit policy of this stage (the one builder: every strategy's and the pipeline's):
        its exits among `exit_layers` (None: all), with `exit_thresholds` (by --exit-layer-nums
        entry) overriding `threshold` there. No confidence exceeds 1: an exit whose threshold
        is above it never runs its head, and with none left every token goes to full depth."""
        thresholds = exit_thresholds or {}
        allowed = set(self.exit_points if exit_layers is None else exit_layers)
        points = [p for num, p in self.exit_points.items() if num in allowed and thresholds.get(num, threshold) <= 1]
        if not points:
            return FULL_DEPTH
        return ExitPolicy(
            {p.depth: p for p in points},
            threshold,
            measure,
            propagate,
            per_exit={p.depth: thresholds[p.layer_number] for p in points if p.layer_number in thresholds},
        )

    def feed(self, rows: List[int], new_tokens: Sequence[Sequence[int]]) -> Tuple[List[int], List[int]]:
        """The positions [start, end] of each row's new tokens, after the tokens it holds."""
        starts = [self.num_fed[r] for r in rows]
        ends = [s + len(t) - 1 for s, t in zip(starts, new_tokens)]
        for r, e in zip(rows, ends):
            self.num_fed[r] = e + 1
        return starts, ends

    def crop(self, row: int, length: int) -> None:
        """Keep only the first `length` positions of `row` (rejected speculative tokens)."""
        self.cache.crop(row, length)
        self.num_fed[row] = min(self.num_fed[row], length)

    # -- the step: the whole model, rows leaving at exits --------------------------

    @torch.no_grad()
    def step(
        self,
        rows: List[int],
        new_tokens: Sequence[Sequence[int]],
        policy: Union[ExitPolicy, Sequence[ExitPolicy]] = FULL_DEPTH,
        all_logits: bool = False,
        observe: Optional[Callable] = None,
        resume: Sequence[Tuple[int, int, ExitPolicy]] = (),
        park_below: int = 0,
        rewait: Collection[int] = (),
    ) -> StepOutput:
        """Feed `new_tokens[i]` to row `rows[i]` after the tokens it already holds. `policy`
        is every row's, or a list of one per row (rows of a continuous batch: each its own
        exits, thresholds, measure and K/V fill; a row still in its prompt runs FULL_DEPTH).
        `observe(depth, x, attention_output)` sees the hidden states after every depth.
        Regrouping (DREX): a group of fewer than `park_below` rows going on past an exit (this
        step's early-exit rows and the rows resumed there), each of them allowed to wait (fed
        here, or resumed and in `rewait`), waits there (`StepOutput.parked`) instead of running
        the deeper layers alone; `resume` (row, depth, policy) rows waiting from an earlier
        step join the rows going on past `depth`."""
        if not (self.first and self.last):
            raise InferenceConfigError(
                f"Decoder.step needs the whole model; this stage holds layers {self.offset + 1} to "
                f"{self.offset + len(self.layers)} (over pipeline stages use FullDepth or EarlyExit(kv='pipeline'))"
            )
        policies = [policy] * len(rows) if isinstance(policy, ExitPolicy) else list(policy)
        joining: Dict[int, list] = {}  # depth -> resumed (row, policy) joining past it
        for row, depth, pol in resume:
            joining.setdefault(depth, []).append((row, pol))
        every_policy = {id(q): q for q in policies + [pol for _, _, pol in resume]}.values()
        points = {d: p for pol in every_policy for d, p in pol.exits.items()}
        starts, ends = self.feed(rows, new_tokens)
        ws = self._work_set(rows, starts, ends) if rows else None
        x, attention_output, previous = self._embed(new_tokens, ws) if rows else None, None, None
        done: Dict[int, Decision] = {}
        parked: Dict[int, int] = {}
        for depth in range(self.num_layers + 1):
            if depth > 0:
                x, ws, policies = self._join(x, ws, policies, joining.pop(depth - 1, []), depth - 1)
            point = points.get(depth)
            if ws is not None:
                if depth > 0:
                    x, ws = self._align(x, ws, depth - 1)
                    previous = x[-1]
                    x, attention_output = self._run_layer(depth - 1, x, ws)
                if observe is not None:
                    observe(depth, x, attention_output)
                block_output = self._run_exit_block(depth, x, ws)
                if point is not None:
                    x, ws, policies = self._exit_rows(
                        point, policies, x, attention_output, previous, ws, done, block_output
                    )
            if (
                point is not None
                and park_below
                and self._may_wait(ws, policies, joining.get(depth, []), joining, depth, park_below, resume, rewait)
            ):
                if ws is not None:
                    self._save_frontier(x, ws)  # their inputs to the layers past `depth`
                    parked.update((r, depth) for r in ws.rows)
                parked.update((r, depth) for r, _ in joining.pop(depth, []))  # theirs are saved already
                x, ws = None, None
            if ws is None and not joining:
                break
        chunk_logits = None
        if ws is not None:
            logits = final_logits(self.model, x if all_logits else x[-1:])  # [c or 1, b, V]
            for i, r in enumerate(ws.rows):
                done[r] = (self.num_layers, logits[-1, i])
            if all_logits:
                chunk_logits = [logits[-w:, i] for i, w in enumerate(ws.widths)]
        decided = [r for r in rows if r not in parked] + [r for r, _, _ in resume if r not in parked]
        logits = torch.stack([done[r][1] for r in decided]) if decided else None
        return StepOutput(decided, [done[r][0] for r in decided], logits, chunk_logits, parked)

    @staticmethod
    def _may_wait(ws, policies, here, joining, depth: int, park_below: int, resume, rewait) -> bool:
        """The group going on past the exit at `depth` (ws's rows and `here`, the resumed rows about
        to join past it) waits for a bigger one: it is smaller than `park_below`, no other resumed
        rows wait deeper (the deeper layers run for them anyway), its fed rows are early-exit rows
        and its resumed rows may wait again (`rewait`)."""
        rows = ([] if ws is None else ws.rows) + [r for r, _ in here]
        if not rows or len(rows) >= park_below or any(d != depth for d in joining):
            return False
        resumed = {r for r, _, _ in resume}
        return all(pol.exits for pol in (policies if ws is not None else ())) and all(
            r in rewait for r in rows if r in resumed
        )

    def _join(self, x, ws: Optional[WorkSet], policies: List[ExitPolicy], joiners, index: int):
        """Rows resumed from the previous step join the rows going on into layer `index`;
        their inputs wait in `frontier` (saved when they parked)."""
        if not joiners:
            return x, ws, policies
        if ws is not None:
            self._save_frontier(x, ws)
        rows = ([] if ws is None else ws.rows) + [r for r, _ in joiners]
        ends = ([] if ws is None else ws.ends) + [self.num_fed[r] - 1 for r, _ in joiners]
        ws = self._work_set(rows, [self.cache.lengths[index][r] for r in rows], ends)
        return self.frontier[ws.rows_t.view(1, -1), ws.pos], ws, (policies or []) + [pol for _, pol in joiners]

    def _align(self, x: Tensor, ws: WorkSet, index: int):
        """Widen each row's chunk back to the first position layer `index` lacks, fetching
        the owed positions' inputs from `frontier`."""
        starts = [self.cache.lengths[index][r] for r in ws.rows]
        if starts == ws.starts:
            return x, ws
        self._save_frontier(x, ws)
        ws = self._work_set(ws.rows, starts, ws.ends)
        return self.frontier[ws.rows_t.view(1, -1), ws.pos], ws

    def _save_frontier(self, x: Tensor, ws: WorkSet) -> None:
        self.frontier[ws.rows_t.view(1, -1).expand_as(ws.write_pos), ws.write_pos] = x

    def _run_exit_block(self, depth: int, x: Tensor, ws: WorkSet) -> Optional[Tensor]:
        """The exit block at `depth` (if any) over the work set, on its own cache slot."""
        slot = self.exit_blocks.get(depth)
        if slot is None:
            return None
        block = self.model.exits[str(depth + self.model.ee_config.pre_exit)].block
        out, _ = run_layer(block, x, ws, self.cache, slot, attention_scale(block))
        self.cache.set_length(slot, ws.rows, [e + 1 for e in ws.ends])
        return out

    def _exit_rows(
        self,
        point: ExitPoint,
        policies: List[ExitPolicy],
        x,
        attention_output,
        previous,
        ws,
        done,
        block_output: Optional[Tensor] = None,
    ):
        """Rows whose newest token is confident at `point` under their own policy take their
        token and leave; returns the hidden states, work set and policies of the rows going
        on (None, None, None if none)."""
        last = (x if block_output is None else block_output)[-1:]  # [1, b, h]: what the head reads
        head_input = attention_output[-1:] if point.head.has_mlp and attention_output is not None else None
        fire, logits = self._test(point, policies, last, head_input, previous)
        if not any(fire):
            return x, ws, policies
        cols = [i for i, f in enumerate(fire) if f]
        every = len(cols) == len(fire)  # all rows leave (always so when drafting): no subsets to cut
        cols_t = None if every else to_device(self.device, cols)[0]

        def pick(t: Tensor, dim: int) -> Tensor:
            return t if every else t.index_select(dim, cols_t)

        if logits is None:
            sub_input = pick(head_input, 1) if head_input is not None else None
            logits = head_logits(self.model, point, pick(last, 1), sub_input)[0]
        else:
            logits = pick(logits, 0)
        for i, col in enumerate(cols):
            done[ws.rows[col]] = (point.depth, logits[i])
        left = ws if every else self._select(ws, cols)
        propagate = [policies[c].propagate for c in cols]
        if all(propagate):
            self._propagate(pick(x[-1], 0), point.depth, left)
        elif not any(propagate):
            self._save_frontier(pick(x, 1)[-left.width :], left)
        else:  # rows of both kinds leave here: each kind its own way
            x_left, last_left = pick(x, 1)[-left.width :], pick(x[-1], 0)
            for kind in (True, False):
                sub = [i for i, p in enumerate(propagate) if p == kind]
                sub_t = to_device(self.device, sub)[0]
                part = self._select(left, sub)
                if kind:
                    self._propagate(last_left.index_select(0, sub_t), point.depth, part)
                else:
                    self._save_frontier(x_left.index_select(1, sub_t)[-part.width :], part)
        if every:
            return None, None, None
        keep = [i for i, f in enumerate(fire) if not f]
        going = self._select(ws, keep)
        return x[-going.width :].index_select(1, to_device(self.device, keep)[0]), going, [policies[i] for i in keep]

    def _test(self, point: ExitPoint, policies: List[ExitPolicy], last, head_input, previous):
        """Which rows fire at `point`, each under its own policy (a row whose policy has no
        exit here never does), read from the device once for all rows; and the exit's logits
        [b, V] where the tests computed them for every row that fires (else None)."""
        groups: Dict[tuple, List[int]] = {}  # rows tested alike: one fire_mask each
        for i, pol in enumerate(policies):
            if point.depth in pol.exits:
                groups.setdefault((pol.threshold_at(point.depth), pol.measure), []).append(i)
        b = len(policies)
        if len(groups) == 1 and len(next(iter(groups.values()))) == b:
            ((threshold, measure),) = groups
            return confidence_test(self.model, point, threshold, measure, last, head_input, previous)
        fire = torch.zeros(b, dtype=torch.bool, device=self.device)
        logits, projected = None, [False] * b
        for (threshold, measure), cols in groups.items():
            cols_t = to_device(self.device, cols)[0]
            sub_fire, sub_logits = fire_mask(
                self.model,
                point,
                threshold,
                measure,
                last.index_select(1, cols_t),
                None if head_input is None else head_input.index_select(1, cols_t),
                None if previous is None else previous.index_select(0, cols_t),
            )
            if sub_fire is None:
                fire.index_fill_(0, cols_t, True)
            else:
                fire.index_copy_(0, cols_t, sub_fire)
            if sub_logits is not None:
                if logits is None:
                    logits = sub_logits.new_zeros(b, sub_logits.shape[-1])
                logits.index_copy_(0, cols_t, sub_logits)
                for c in cols:
                    projected[c] = True
        fire = fire.tolist()  # the one read of this exit's decisions
        if any(f and not projected[c] for c, f in enumerate(fire)):
            logits = None  # some firing row has none: the exit head runs once for all that fire
        return fire, logits

    def _select(self, ws: WorkSet, cols: List[int]) -> WorkSet:
        return self._work_set([ws.rows[i] for i in cols], [ws.starts[i] for i in cols], [ws.ends[i] for i in cols])

    def _propagate(self, hidden: Tensor, depth: int, ws: WorkSet) -> None:
        """CALM: every layer above `depth` gets K/V of the rows' newest token from the exit
        hidden state [b, h], through its own input norm, K/V projection and rotary: in one
        projection for all of them where the layout allows (propagation.py)."""
        newest = self._work_set(ws.rows, ws.ends, ws.ends)
        hidden = hidden.unsqueeze(0)
        fused = self.propagators.at(depth)
        if fused is not None:
            k, v = fused(hidden, newest)
            self.cache.update_layers(depth, newest.rows_t, newest.write_pos, k, v)
        else:
            for index in range(depth, len(self.layers)):
                _, k, v = project_qkv(self.layers[index], hidden, newest)
                self.cache.update(index, newest.rows_t, newest.write_pos, k, v)
        for index in range(depth, len(self.layers)):
            self.cache.set_length(index, newest.rows, [e + 1 for e in newest.ends])
        for block_depth, slot in self.exit_blocks.items():  # deeper exit blocks: their K/V too
            if block_depth > depth:
                block = self.model.exits[str(block_depth + self.model.ee_config.pre_exit)].block
                _, k, v = project_qkv(block, hidden, newest)
                self.cache.update(slot, newest.rows_t, newest.write_pos, k, v)
                self.cache.set_length(slot, newest.rows, [e + 1 for e in newest.ends])

    # -- the stage pass: every row through every layer, exits only decide ----------

    @torch.no_grad()
    def run_stage(
        self,
        x,
        rows: List[int],
        starts: List[int],
        ends: List[int],
        open_rows: List[bool],
        policy: ExitPolicy = FULL_DEPTH,
    ) -> Tuple[Tensor, Dict[int, Decision]]:
        """Run positions [start, end] of each row through this stage's layers. `x` holds the
        rows' new tokens on the first stage, the previous stage's hidden states [c, b, h] on a
        later one. The policy's exits decide the rows still open, the last stage's output layer
        those open after them. Returns (hidden states out, {row: decision} made here)."""
        ws = self._work_set(rows, starts, ends)
        if self.first:
            x = self._embed(x, ws)
        decided: Dict[int, Decision] = {}
        open_rows = list(open_rows)
        previous, attention_output = None, None
        columns = {}  # the open rows' columns, as an index on the device per set of open rows
        for depth in range(self.offset, self.offset + len(self.layers) + 1):
            if depth > self.offset:
                previous = x[-1]
                x, attention_output = self._run_layer(depth - 1 - self.offset, x, ws)
            block_output = self._run_exit_block(depth, x, ws)
            point = policy.exits.get(depth)
            if point is not None and any(open_rows):
                self._decide(
                    point,
                    policy,
                    x if block_output is None else block_output,
                    attention_output,
                    previous,
                    rows,
                    open_rows,
                    decided,
                    columns,
                )
        if self.last and any(open_rows):
            cols, pick = self._open_columns(open_rows, columns)
            logits = final_logits(self.model, pick(x[-1:], 1))[0]
            for i, col in enumerate(cols):
                decided[rows[col]] = (self.num_layers, logits[i])
        return x, decided

    def _open_columns(self, open_rows: List[bool], columns: dict):
        """(open columns, a function selecting them along a dim): indexing a device tensor
        with a Python list would copy the list over and wait; a pinned, non-blocking index
        tensor does not (made once per set of open rows of a step)."""
        key = tuple(open_rows)
        if key not in columns:
            cols = [i for i, o in enumerate(open_rows) if o]
            index = None if len(cols) == len(open_rows) else to_device(self.device, cols)[0]
            columns[key] = (cols, (lambda t, dim: t) if index is None else (lambda t, dim: t.index_select(dim, index)))
        return columns[key]

    def _decide(
        self, point: ExitPoint, policy: ExitPolicy, x, attention_output, previous, rows, open_rows, decided, columns
    ) -> None:
        """The open rows confident at `point` are decided there (and closed in `open_rows`)."""
        cols, pick = self._open_columns(open_rows, columns)
        last = pick(x[-1:], 1)
        head_input = pick(attention_output[-1:], 1) if point.head.has_mlp and attention_output is not None else None
        fire, logits = confidence_test(
            self.model,
            point,
            policy.threshold_at(point.depth),
            policy.measure,
            last,
            head_input,
            None if previous is None else pick(previous, 0),
        )
        if not any(fire):
            return
        if logits is None:
            logits = head_logits(self.model, point, last, head_input)[0]
        for i, col in enumerate(cols):
            if fire[i]:
                decided[rows[col]] = (point.depth, logits[i])
                open_rows[col] = False

    # -- shared pieces ---------------------------------------------------------------

    def _work_set(self, rows, starts, ends) -> WorkSet:
        return build_work_set(rows, starts, ends, self.cache.trash_slot, self.rotary, self.device)

    def _embed(self, new_tokens, ws: WorkSet) -> Tensor:
        width = ws.width
        flat = [t for row in new_tokens for t in [0] * (width - len(row)) + list(row)]  # right-aligned, front padding
        grid = to_device(self.device, flat)[0].view(len(new_tokens), width)
        return embed(self.model, grid.t(), ws)

    def _run_layer(self, index: int, x: Tensor, ws: WorkSet) -> Tuple[Tensor, Tensor]:
        """This stage's layer `index` over the work set, its cache then valid up to the ends."""
        x, attention_output = run_layer(self.layers[index], x, ws, self.cache, index, self.scales[index])
        self.cache.set_length(index, ws.rows, [e + 1 for e in ws.ends])
        return x, attention_output
