"""The decoder: one step feeds each row's new tokens layer by layer, stopping rows at exits.

A step's work at layer i is, for every row still going, the positions from the cache's
valid length at that layer up to the row's newest token. Usually that is just the newest
token; after an early exit by recomputation it also holds the tokens that left at a
shallower exit and owe this layer its K/V (EE-LLM's recomputation, batched with the
current token). Their inputs wait in `frontier`: the hidden state of each position after
the deepest layer it went through.

Rows decide independently: at an exit, the rows whose confidence reaches the threshold
take their token there and drop out of the batch (an index_select on the batch dim), so
deeper layers run only for the rows still going. A row that left either owes its deeper
K/V (recomputation) or has them filled at once from its exit hidden state through each
deeper layer's input norm and K/V projection (CALM's state propagation).

Positions and lengths live on the host, so a step issues no device sync except one per
active exit: skipping the deeper layers for some rows needs their decision there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from megatron.early_exit.inference.confidence import ConfidenceMeasure
from megatron.early_exit.inference.errors import InferenceConfigError
from megatron.early_exit.inference.kv_cache import KVCache
from megatron.early_exit.inference.layers import (
    RotaryTables, WorkSet, attention_scale, build_work_set, embed, exit_logits, final_logits, project_qkv, run_layer,
    to_device,
)


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


FULL_DEPTH = ExitPolicy()


@dataclass
class StepOutput:
    rows: List[int]
    depths: List[int]  # layers each row's newest token went through (num_layers: final)
    logits: Tensor  # [b, vocab] float32: the newest token's logits, from the layer it left at
    chunk_logits: Optional[List[Tensor]] = None  # all_logits: per row [n, vocab] of its last-layer chunk


def validate_model(model, pipeline_stages: bool = False) -> None:
    config, ee = model.config, model.ee_config
    unsupported = {
        "sequence parallelism (build the inference model without --sequence-parallel)": config.sequence_parallel,
        "pipeline stages (over stages use FullDepth or EarlyExit(kv='pipeline'))":
            not pipeline_stages and not (model.pre_process and model.post_process),
        "--use-exit-block (an exit block would need its own KV cache)": ee.use_exit_block,
        "multi-latent attention": config.multi_latent_attention,
        "mixture of experts": config.num_moe_experts is not None,
        "sliding-window attention": config.window_size is not None,
        "gated attention output": config.attention_output_gate,
        f"softmax_type {config.softmax_type!r}": config.softmax_type != "vanilla",
        f"position embedding {model.position_embedding_type!r}": model.position_embedding_type not in ("rope", "learned_absolute", "none"),
    }
    bad = [name for name, present in unsupported.items() if present]
    if bad:
        raise InferenceConfigError(f"the inference decoder does not support {', '.join(bad)}")


def confidence_test(model, point: ExitPoint, threshold: float, measure, last: Tensor, head_input, previous):
    """Which rows' newest token (last [1, b, h]) fires at `point`, and the exit's logits
    when the measure needed them."""
    if threshold == -math.inf:
        return [True] * last.shape[1], None
    if measure.uses_logits:
        logits = exit_logits(model, point.head, point.layer, last, head_input)[0]
        return (measure.fn(logits) >= threshold).tolist(), logits
    if previous is None:  # saturation before the first layer: nothing to compare
        return [False] * last.shape[1], None
    return (measure.fn(last[0], previous) >= threshold).tolist(), None


class Decoder:
    """Runs an EarlyExitGPTModel (PP=1, any TP) over a KV cache of `max_batch` rows."""

    def __init__(self, model, max_batch: int, max_seq: int):
        validate_model(model)
        self.model = model
        self.layers = list(model.decoder.layers)
        self.num_layers = len(self.layers)
        attention = self.layers[0].self_attention
        weight = model.embedding.word_embeddings.weight
        self.cache = KVCache(self.num_layers, max_batch, max_seq, attention.num_query_groups_per_partition,
                             attention.hidden_size_per_attention_head, weight.dtype, weight.device)
        self.frontier = torch.zeros(max_batch, max_seq + 1, model.config.hidden_size, dtype=weight.dtype, device=weight.device)
        self.num_fed = [0] * max_batch  # positions whose token has been embedded, per row
        self.rotary = RotaryTables(model, max_seq, weight.dtype) if model.position_embedding_type == "rope" else None
        self.scales = [attention_scale(layer) for layer in self.layers]
        self.device = weight.device
        pre = model.ee_config.pre_exit
        self.exit_points = {
            int(num): ExitPoint(int(num) - pre, int(num), head, self.layers[int(num) - 1])
            for num, head in model.exits.items()
        }

    # -- the step ----------------------------------------------------------------

    @torch.no_grad()
    def step(self, rows: List[int], new_tokens: Sequence[Sequence[int]], policy: ExitPolicy = FULL_DEPTH,
             all_logits: bool = False) -> StepOutput:
        """Feed `new_tokens[i]` to row `rows[i]` after the tokens it already holds."""
        starts = [self.num_fed[r] for r in rows]
        ends = [s + len(t) - 1 for s, t in zip(starts, new_tokens)]
        ws = self._work_set(rows, starts, ends)
        x, attention_output, previous = self._embed(new_tokens, ws), None, None
        done: Dict[int, tuple] = {}  # row -> (depth, logits)
        for depth in range(self.num_layers + 1):
            if depth > 0:
                x, ws = self._align(x, ws, depth - 1)
                previous = x[-1]
                x, attention_output = run_layer(self.layers[depth - 1], x, ws, self.cache, depth - 1, self.scales[depth - 1])
                self.cache.set_length(depth - 1, ws.rows, [e + 1 for e in ws.ends])
            point = policy.exits.get(depth)
            if point is not None:
                x, ws = self._exit_rows(point, policy, x, attention_output, previous, ws, done)
                if ws is None:
                    break
        chunk_logits = None
        if ws is not None:
            logits = final_logits(self.model, x if all_logits else x[-1:])  # [c or 1, b, V]
            for i, r in enumerate(ws.rows):
                done[r] = (self.num_layers, logits[-1, i])
            if all_logits:
                chunk_logits = [logits[-w:, i] for i, w in enumerate(ws.widths)]
        for r, e in zip(rows, ends):
            self.num_fed[r] = e + 1
        return StepOutput(rows, [done[r][0] for r in rows], torch.stack([done[r][1] for r in rows]), chunk_logits)

    def crop(self, row: int, length: int) -> None:
        """Keep only the first `length` positions of `row` (rejected speculative tokens)."""
        self.cache.crop(row, length)
        self.num_fed[row] = min(self.num_fed[row], length)

    # -- pieces of the step ------------------------------------------------------

    def _work_set(self, rows, starts, ends) -> WorkSet:
        return build_work_set(rows, starts, ends, self.cache.trash_slot, self.rotary, self.device)

    def _embed(self, new_tokens, ws: WorkSet) -> Tensor:
        width = ws.width
        flat = [t for row in new_tokens for t in [0] * (width - len(row)) + list(row)]  # right-aligned, front padding
        grid = to_device(self.device, flat)[0].view(len(new_tokens), width)
        return embed(self.model, grid.t(), ws)

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

    def _exit_rows(self, point: ExitPoint, policy: ExitPolicy, x, attention_output, previous, ws, done):
        """Rows whose newest token is confident at `point` take their token and leave;
        returns the hidden states and work set of the rows going on (None, None if none)."""
        last = x[-1:]  # [1, b, h]
        head_input = attention_output[-1:] if point.head.has_mlp else None
        fire, logits = confidence_test(self.model, point, policy.threshold, policy.measure, last, head_input, previous)
        if not any(fire):
            return x, ws
        cols = [i for i, f in enumerate(fire) if f]
        every = len(cols) == len(fire)  # all rows leave (always so when drafting): no subsets to cut
        cols_t = None if every else to_device(self.device, cols)[0]

        def pick(t: Tensor, dim: int) -> Tensor:
            return t if every else t.index_select(dim, cols_t)

        if logits is None:
            sub_input = pick(head_input, 1) if head_input is not None else None
            logits = exit_logits(self.model, point.head, point.layer, pick(last, 1), sub_input)[0]
        else:
            logits = pick(logits, 0)
        for i, col in enumerate(cols):
            done[ws.rows[col]] = (point.depth, logits[i])
        left = ws if every else self._select(ws, cols)
        if policy.propagate:
            self._propagate(pick(last[0], 0), point.depth, left)
        else:
            self._save_frontier(pick(x, 1)[-left.width:], left)
        if every:
            return None, None
        keep = [i for i, f in enumerate(fire) if not f]
        going = self._select(ws, keep)
        return x[-going.width:].index_select(1, to_device(self.device, keep)[0]), going

    def _select(self, ws: WorkSet, cols: List[int]) -> WorkSet:
        return self._work_set([ws.rows[i] for i in cols], [ws.starts[i] for i in cols], [ws.ends[i] for i in cols])

    def _propagate(self, hidden: Tensor, depth: int, ws: WorkSet) -> None:
        """CALM: every layer above `depth` gets K/V of the rows' newest token from the exit
        hidden state [b, h], through its own input norm, K/V projection and rotary."""
        newest = self._work_set(ws.rows, ws.ends, ws.ends)
        hidden = hidden.unsqueeze(0)
        for index in range(depth, self.num_layers):
            _, k, v = project_qkv(self.layers[index], hidden, newest)
            self.cache.update(index, newest.rows_t, newest.write_pos, k, v)
            self.cache.set_length(index, newest.rows, [e + 1 for e in newest.ends])
