"""Pipeline-based early exit (EE-LLM) for a model split into pipeline stages.

Every stage keeps the KV cache of its own layers and runs every row through them, so
the K/V of a token that left early are those full-depth decoding would have written:
the stages after its exit finish them while the first stage already works on the next
token. One step, as a timeline:

    stage 0    embed + layers (+ its exits) ─► send hidden on ─► tokens known? next step : wait for them
    stage k    recv hidden ─► layers; an exit decides rows not yet decided ─► send decisions to stage 0
                                                                         └─► send hidden on (KV completion)
    last       ... its final layer decides every row still open

Decisions travel straight to stage 0 (one message per stage per step, consumed in
order), which samples, applies stop tokens and budgets exactly as `generate` does, and
tells the stages which rows take part in the next step. All sends are non-blocking, so
no stage waits on a stage that is behind it. With one stage this is the same method
without the overlap (the reference a pipeline run must reproduce).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from megatron.core import parallel_state

from megatron.early_exit.inference.decoder import ExitPoint, StepOutput, confidence_test, validate_model
from megatron.early_exit.inference.errors import InferenceConfigError
from megatron.early_exit.inference.generate import _now
from megatron.early_exit.inference.kv_cache import KVCache
from megatron.early_exit.inference.layers import (
    RotaryTables, attention_scale, build_work_set, embed, exit_logits, final_logits, run_layer,
)
from megatron.early_exit.inference.result import GenerationResult, Transcript

STEP, STOP = 1, 0
# Message tags of their own, so that nothing else sent between the same ranks can be taken
# for a step or a decision.
STEP_TAG, DECISION_TAG = 7101, 7102


class StageDecoder:
    """This stage's layers over its own KV cache; rows run [start, end] positions."""

    def __init__(self, model, max_batch: int, max_seq: int, exit_layers: Optional[List[int]], threshold: float, measure):
        validate_model(model, pipeline_stages=True)
        self.model, self.layers = model, list(model.decoder.layers)
        self.first, self.last = model.pre_process, model.post_process
        attention = self.layers[0].self_attention
        dtype = self.layers[0].input_layernorm.weight.dtype
        self.device = self.layers[0].input_layernorm.weight.device
        self.cache = KVCache(len(self.layers), max_batch, max_seq, attention.num_query_groups_per_partition,
                             attention.hidden_size_per_attention_head, dtype, self.device)
        self.rotary = RotaryTables(model, max_seq, dtype) if model.position_embedding_type == "rope" else None
        self.scales = [attention_scale(layer) for layer in self.layers]
        self.num_layers, self.hidden_size, self.dtype = model.config.num_layers, model.config.hidden_size, dtype
        self.vocab_size = model.vocab_size
        pre = model.ee_config.pre_exit
        allowed = set(model.ee_config.exit_layer_nums if exit_layers is None else exit_layers)
        first_number = self.layers[0].layer_number
        # Exits of this stage by the index of the layer they read after (-1: before the first).
        self.exits: Dict[int, ExitPoint] = {
            int(num) - pre - first_number: ExitPoint(int(num) - pre, int(num), head, self.layers[int(num) - first_number])
            for num, head in model.exits.items() if int(num) in allowed
        }
        if threshold > 1:  # no confidence reaches it: full depth, heads never run
            self.exits = {}
        self.threshold, self.measure = threshold, measure

    def run(self, x: Tensor, rows: List[int], starts: List[int], ends: List[int], open_rows: List[bool],
            use_exits: bool) -> Tuple[Tensor, Dict[int, Tuple[int, Tensor]]]:
        """Run this stage's layers; returns (hidden out, {row: (depth, logits)} decided here)."""
        ws = build_work_set(rows, starts, ends, self.cache.trash_slot, self.rotary, self.device)
        if self.first:
            width = ws.width
            x = embed(self.model, torch.tensor([[0] * (width - len(t)) + t for t in x], device=self.device).t(), ws)
        decided: Dict[int, Tuple[int, Tensor]] = {}
        open_rows = list(open_rows)
        previous, attention_output = None, None
        for index in range(-1, len(self.layers)):
            if index >= 0:
                previous = x[-1]
                x, attention_output = run_layer(self.layers[index], x, ws, self.cache, index, self.scales[index])
                self.cache.set_length(index, ws.rows, [e + 1 for e in ws.ends])
            point = self.exits.get(index) if use_exits else None
            if point is not None and any(open_rows):
                self._decide(point, x, attention_output if index >= 0 else None, previous, rows, open_rows, decided)
        if self.last and any(open_rows):
            cols = [i for i, o in enumerate(open_rows) if o]
            logits = final_logits(self.model, x[-1:, cols])[0]
            for i, col in enumerate(cols):
                decided[rows[col]] = (self.num_layers, logits[i])
        return x, decided

    def _decide(self, point, x, attention_output, previous, rows, open_rows, decided) -> None:
        cols = [i for i, o in enumerate(open_rows) if o]
        last = x[-1:, cols]
        head_input = attention_output[-1:, cols] if point.head.has_mlp and attention_output is not None else None
        fire, logits = confidence_test(self.model, point, self.threshold, self.measure, last, head_input,
                                       None if previous is None else previous[cols])
        if not any(fire):
            return
        if logits is None:
            logits = exit_logits(self.model, point.head, point.layer, last, head_input)[0]
        for i, col in enumerate(cols):
            if fire[i]:
                decided[rows[col]] = (point.depth, logits[i])
                open_rows[col] = False


class _Links:
    """Point-to-point messages of one pipeline (same TP rank on every stage)."""

    def __init__(self, max_batch: int, vocab: int):
        self.stage = parallel_state.get_pipeline_model_parallel_rank()
        self.num_stages = parallel_state.get_pipeline_model_parallel_world_size()
        self.prev = parallel_state.get_pipeline_model_parallel_prev_rank()
        self.next = parallel_state.get_pipeline_model_parallel_next_rank()
        self.first_rank = parallel_state.get_pipeline_model_parallel_first_rank()
        self.ranks = torch.distributed.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
        self.max_batch, self.vocab = max_batch, vocab
        self.pending: List = []  # (handle, buffer) of non-blocking sends

    def _isend(self, tensor: Tensor, dst: int, tag: int) -> None:
        self.pending.append((torch.distributed.isend(tensor, dst, tag=tag), tensor))

    def send_step(self, kind: int, rows, starts, ends, open_rows, hidden: Optional[Tensor]) -> None:
        b = self.max_batch
        header = torch.full((3 + 4 * b,), -1, dtype=torch.int64)
        header[:3] = torch.tensor([kind, len(rows), 0 if hidden is None else hidden.shape[0]])
        for j, values in enumerate((rows, starts, ends, [int(o) for o in open_rows])):
            header[3 + j * b: 3 + j * b + len(values)] = torch.tensor(values, dtype=torch.int64)
        self._isend(header.to(self._device(hidden)), self.next, STEP_TAG)
        if hidden is not None:
            self._isend(hidden.contiguous(), self.next, STEP_TAG)

    def recv_step(self, hidden_size: int, dtype, device):
        b = self.max_batch
        header = torch.empty(3 + 4 * b, dtype=torch.int64, device=device)
        torch.distributed.recv(header, self.prev, tag=STEP_TAG)
        kind, n, width = header[:3].tolist()
        if kind == STOP:
            return STOP, None
        rows, starts, ends, open_rows = (header[3 + j * b: 3 + j * b + n].tolist() for j in range(4))
        hidden = torch.empty(width, n, hidden_size, dtype=dtype, device=device)
        torch.distributed.recv(hidden, self.prev, tag=STEP_TAG)
        return STEP, (rows, starts, ends, [bool(o) for o in open_rows], hidden)

    def send_decisions(self, decided: Dict[int, Tuple[int, Tensor]], device) -> None:
        message = torch.zeros(self.max_batch, self.vocab + 2, dtype=torch.float32, device=device)
        for row, (depth, logits) in decided.items():
            message[row, 0], message[row, 1], message[row, 2:] = 1.0, depth, logits[: self.vocab].float()
        self._isend(message, self.first_rank, DECISION_TAG)

    def recv_decisions(self, stage: int, device) -> Tensor:
        message = torch.empty(self.max_batch, self.vocab + 2, dtype=torch.float32, device=device)
        torch.distributed.recv(message, self.ranks[stage], tag=DECISION_TAG)
        return message

    def finish(self) -> None:
        for handle, _ in self.pending:
            handle.wait()
        self.pending.clear()

    @staticmethod
    def _device(hidden):
        return hidden.device if hidden is not None else ("cuda" if torch.cuda.is_available() else "cpu")


def pipeline_generate(model, prompts: List[List[int]], max_new_tokens: int, sampling, stop_tokens, strategy,
                      exit_layers: Optional[List[int]], threshold: float, measure) -> GenerationResult:
    """Pipeline-based early exit over this rank's stage; every rank returns the result."""
    stage = StageDecoder(model, len(prompts), max(len(p) for p in prompts) + max_new_tokens, exit_layers, threshold, measure)
    links = _Links(len(prompts), model.vocab_size)
    result = GenerationResult([[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts],
                              num_layers=model.config.num_layers, strategy=strategy)
    if stage.first:
        start = _now(stage.device)
        transcript = Transcript(result, max_new_tokens, frozenset(int(t) for t in stop_tokens), sampling,
                                sampling.make_generator(stage.device), active=list(range(len(prompts))))
        _lead(stage, links, transcript, prompts, start)
    else:
        _follow(stage, links)
    links.finish()
    if links.num_stages > 1:  # every rank returns the same result
        holder = [result]
        torch.distributed.broadcast_object_list(holder, links.first_rank, group=parallel_state.get_pipeline_model_parallel_group())
        result = holder[0]
    return result


def _lead(stage: StageDecoder, links: _Links, transcript: Transcript, prompts, start: float) -> None:
    """Stage 0: runs each step, collects its decisions, picks the tokens."""
    fed = [0] * len(prompts)
    received = [0] * links.num_stages  # decision messages consumed per stage
    step = 0
    while transcript.active:
        rows = list(transcript.active)
        new = [list(prompts[r]) if step == 0 else [transcript.last_token(r)] for r in rows]
        starts = [fed[r] for r in rows]
        ends = [s + len(t) - 1 for s, t in zip(starts, new)]
        open_rows = [True] * len(rows)
        hidden, decided = stage.run(new, rows, starts, ends, open_rows, use_exits=step > 0)  # prefill: full depth
        if links.num_stages > 1:
            links.send_step(STEP, rows, starts, ends, [r not in decided for r in rows], hidden)
        for later in range(1, links.num_stages):
            while len(decided) < len(rows) and received[later] <= step:
                message = links.recv_decisions(later, stage.device)
                received[later] += 1
                for r in torch.nonzero(message[:, 0]).flatten().tolist():
                    decided[r] = (int(message[r, 1]), message[r, 2:])
        for r, e in zip(rows, ends):
            fed[r] = e + 1
        transcript.take(StepOutput(rows, [decided[r][0] for r in rows], torch.stack([decided[r][1] for r in rows])))
        if step == 0:
            transcript.result.prefill_seconds = _now(stage.device) - start
        else:
            transcript.result.num_steps += 1
        step += 1
    transcript.result.decode_seconds = _now(stage.device) - start - transcript.result.prefill_seconds
    if links.num_stages > 1:
        links.send_step(STOP, [], [], [], [], None)
        for later in range(1, links.num_stages):  # messages of steps decided without them
            while received[later] < step:
                links.recv_decisions(later, stage.device)
                received[later] += 1


def _follow(stage: StageDecoder, links: _Links) -> None:
    """Stages after the first: layers for every row, decisions for the rows still open."""
    step = 0
    while True:
        kind, payload = links.recv_step(stage.hidden_size, stage.dtype, stage.device)
        if kind == STOP:
            if not stage.last:
                links.send_step(STOP, [], [], [], [], None)
            return
        rows, starts, ends, open_rows, hidden = payload
        hidden, decided = stage.run(hidden, rows, starts, ends, open_rows, use_exits=step > 0)
        links.send_decisions(decided, stage.device)
        if not stage.last:
            links.send_step(STEP, rows, starts, ends, [o and r not in decided for r, o in zip(rows, open_rows)], hidden)
        step += 1


def check_pipeline_strategy(model, strategy) -> None:
    from megatron.early_exit.inference.strategies import EarlyExit, FullDepth

    if not isinstance(strategy, (FullDepth, EarlyExit)):
        raise InferenceConfigError(f"{strategy.name} needs the whole model on one stage; pipeline stages run "
                                   "FullDepth or EarlyExit(kv='pipeline')")
    if isinstance(strategy, EarlyExit) and strategy.kv != "pipeline":
        raise InferenceConfigError(f"early exit over pipeline stages completes the K/V of exited tokens on the later "
                                   f"stages: use kv='pipeline', not {strategy.kv!r}")
    if isinstance(strategy, EarlyExit) and strategy.exit_layers is not None:
        unknown = sorted(set(strategy.exit_layers) - set(model.ee_config.exit_layer_nums))
        if unknown:
            raise InferenceConfigError(f"exit layers {unknown} are not exits of this model "
                                       f"(its exits: {sorted(model.ee_config.exit_layer_nums)})")
