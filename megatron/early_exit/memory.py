"""Memory per rank of a training configuration, stage by stage, before launching it.

Terms (bytes on one rank of a stage):
  parameters        this stage's shard of the weights (TP-split matrices, replicated norms)
  gradients         megatron-core DDP's gradient buffer (fp32 when training in bf16/fp16)
  optimizer state   Adam's two moments (+ fp32 master weights in bf16/fp16), split over DP
                    with the distributed optimizer
  activations       what the layers keep for backward, per in-flight microbatch (the most a
                    stage holds at once in its plan: 1F1B warm-up depth p - s, fill items
                    included; interleaved, in-flight forwards of one model chunk each, up to
                    2(p-1-s) + (v-1)p + 1), as the recomputation setting leaves it
  final logits      the output layer's vocabulary-sized logits (fp32 for the loss), kept per
                    in-flight microbatch of the last stage's (last) chunk
  exit logits       each exit's vocabulary-sized logits: exit heads run lazily, just before
                    their microbatch's backward, so they are never held across in-flight
                    microbatches, but all of a stage's exits are alive together then (one at a
                    time with --recompute-exit-heads)
  exit activations  what those heads keep besides their logits: an exit MLP's saved tensors
                    (--use-exit-mlp) or an exit block's, a whole layer's (--use-exit-block)
  distillation      self-distillation's fp32 buffers on the last stage (--exit-distill-weight):
                    the teacher logits' copy, its log-probabilities, and per exit the student
                    and teacher probabilities its KL keeps for backward
  loss buffer       the cross entropy's shifted copy of one set of logits
  backward buffer   while the layers' backward runs: a recomputed unit's activations and,
                    with unfused attention, the gradient of the s x s scores
The total counts the larger of the head terms (final and exit logits, exit activations,
distillation, loss buffer) and the backward buffer: the heads' tensors are freed before the
layers' backward starts. Not in the total: the CUDA context, NCCL's and cuBLAS's buffers and
the caching allocator's fragmentation; a "fits" verdict keeps a margin for them
(CUDA_RESERVE_GB plus ALLOCATOR_MARGIN of the total).

Activation counts per layer are those of the layer modules that run: `local` (megatron-core's
local spec, unfused attention, as on CPU; counted from the tensors autograd saves) or
`transformer_engine` (fused norms and linears, flash attention: no s x s scores kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron.early_exit.models.model_config import ModelConfig
from megatron.early_exit.models.recompute import RecomputeConfig, recompute_units
from megatron.early_exit.pipeline.interleaved import interleaved_plan, layer_place
from megatron.early_exit.pipeline.placement import layer_stage
from megatron.early_exit.pipeline.plan import Action, FillPlan, pipeline_plan

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
HEAD_TERMS = ("final logits", "exit logits", "exit activations", "distillation", "loss buffer")
GB = 1e9
CUDA_RESERVE_GB = 2.0
"""Per GPU, outside PyTorch's allocator: the CUDA context and kernels (~0.5-1 GB), NCCL
communicators and cuBLAS workspaces."""
ALLOCATOR_MARGIN = 0.10
"""Fragmentation of PyTorch's caching allocator, as a share of the estimate."""


@dataclass(frozen=True)
class TrainingShape:
    """How a model is trained: layout, batch and the settings that change memory."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: int = 1
    micro_batch_size: int = 1
    seq_length: int = 2048
    num_microbatches: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    fill: Optional[FillPlan] = None
    kernels: str = "local"
    """"local" or "transformer_engine" (see the module docstring)."""
    num_model_chunks: int = 1
    """Model chunks per stage of the interleaved pipeline (v); 1 without it."""


@dataclass
class StageMemory:
    stage: int
    layers: int
    exits: List[int]
    in_flight: int
    terms: Dict[str, float]  # bytes

    @property
    def total(self) -> float:
        """Logits (alive while the loss and the heads' backward run) and the backward buffer
        (alive while the layers' backward runs) never coexist: the larger of them counts."""
        t = self.terms
        heads = sum(t[n] for n in HEAD_TERMS)
        return sum(v for n, v in t.items() if n not in HEAD_TERMS and n != "backward buffer") + max(
            heads, t["backward buffer"]
        )

    @property
    def largest(self) -> str:
        return max(self.terms, key=self.terms.get)


# Saved [s, b, h]-sized tensors per layer: `boundary` (norm inputs and outputs, residuals;
# split by TP only under sequence parallelism) and `attention` (q, k, the QKV output a
# view of v keeps alive, the context); [s, b, ffn] tensors of the MLP (gated: the fc1
# output of width 2 ffn, SiLU's input and output, the product); whether the [b, a, s, s]
# softmax output is kept.
_KERNELS = {
    "local": dict(boundary=6, attention=6, mlp_gated=5, mlp=2, scores=True),
    "transformer_engine": dict(boundary=2, attention=6, mlp_gated=3, mlp=2, scores=False),
}


def parameter_counts(model: ModelConfig, shape: TrainingShape) -> List[int]:
    """Parameters on one rank of each stage (TP shard)."""
    tp, pp, h = shape.tensor_model_parallel_size, shape.pipeline_model_parallel_size, model.hidden_size
    heads, groups = model.num_attention_heads, model.num_query_groups or model.num_attention_heads
    d = model.kv_channels or h // heads
    norm = h * (1 if model.normalization == "RMSNorm" else 2)
    bias = 0 if model.disable_bias_linear else 1
    mlp_width = model.ffn_hidden_size * (2 if model.swiglu else 1)
    attention = (h * (heads + 2 * groups) * d + heads * d * h) // tp + bias * ((heads + 2 * groups) * d // tp + h)
    mlp = (h * mlp_width + model.ffn_hidden_size * h) // tp + bias * (mlp_width // tp + h)
    layer = attention + mlp + 2 * norm
    vocab = model.padded_vocab_size * h // tp
    ee = model.early_exit
    pp, v = shape.pipeline_model_parallel_size, shape.num_model_chunks
    last = pp * v - 1  # virtual stages u = chunk * pp + stage, each a model of its own
    counts = [0] * pp
    for u in range(pp * v):
        n = layer * model.num_layers // (pp * v)
        if u == 0:
            n += vocab + (
                model.max_position_embeddings * h if model.position_embedding_type == "learned_absolute" else 0
            )
        if u == last:
            n += norm + (vocab if model.untie_embeddings_and_output_weights or last > 0 else 0)
        exits = [e for e in ee.exit_layer_nums if _virtual_stage(e, model.num_layers, pp, v) == u]
        for _ in exits:
            n += (
                (norm if ee.use_exit_norm else 0)
                + (mlp if ee.use_exit_mlp else 0)
                + (layer if ee.use_exit_block else 0)
            )
            n += vocab if ee.untie_exit_output_weights else 0
        # Each chunk with tied exits keeps its own copy of the word embedding (unless it
        # holds the embedding, or the tied output layer serves as the copy).
        tied_copy = (
            exits
            and not ee.untie_exit_output_weights
            and u > 0
            and not (u == last and not model.untie_embeddings_and_output_weights)
        )
        counts[u % pp] += n + (vocab if tied_copy else 0)
    return counts


def _virtual_stage(layer_number: int, num_layers: int, pp: int, v: int) -> int:
    if v == 1:
        return layer_stage(layer_number, num_layers, pp)
    stage, chunk = layer_place(layer_number, num_layers, pp, v)
    return chunk * pp + stage


def stage_plan(shape: TrainingShape) -> List[List[Action]]:
    """The training plan of every stage: interleaved with model chunks, else 1F1B (fill items
    included)."""
    pp, m = shape.pipeline_model_parallel_size, shape.num_microbatches
    return (
        interleaved_plan(pp, m, shape.num_model_chunks)
        if shape.num_model_chunks > 1
        else pipeline_plan(pp, m, shape.fill)
    )


def max_in_flight(shape: TrainingShape, chunk: Optional[int] = None) -> List[int]:
    """Most forwards whose activations a stage holds at once (of one model chunk each), read
    off its plan; `chunk`: only that chunk's."""
    most = []
    for actions in stage_plan(shape):
        held = peak = 0
        for a in actions:
            if chunk is None or a.chunk == chunk:
                held += 1 if a.kind == "F" and a.graph else -1 if a.kind == "B" else 0
            peak = max(peak, held)
        most.append(peak)
    return most


def estimate(model: ModelConfig, shape: TrainingShape) -> List[StageMemory]:
    """Per-stage memory of one rank (bytes), for a model trained in its params_dtype."""
    tp, pp, dp = shape.tensor_model_parallel_size, shape.pipeline_model_parallel_size, shape.data_parallel_size
    dtype = BYTES[model.params_dtype]
    half = dtype == 2
    k = _KERNELS[shape.kernels]
    s, b, h, v = shape.seq_length, shape.micro_batch_size, model.hidden_size, model.padded_vocab_size
    sbh = s * b * h
    boundary = sbh / (tp if shape.sequence_parallel else 1)
    layer_bytes = dtype * (
        k["boundary"] * boundary
        + k["attention"] * sbh / tp
        + (k["mlp_gated"] if model.swiglu else k["mlp"]) * s * b * model.ffn_hidden_size / tp
    )
    scores = b * model.num_attention_heads // tp * s * s * dtype
    dropout_scores = scores * (1 + 1 / dtype) if model.attention_dropout > 0 and k["scores"] else 0.0
    selective = shape.recompute.granularity == "selective"
    if k["scores"] and not selective:
        layer_bytes += scores + s * s / 1  # softmax output and the boolean causal mask
    layer_bytes += 0 if selective else dropout_scores
    logits = 4 * s * b * v / tp  # the loss works in fp32
    params = parameter_counts(model, shape)
    in_flight = max_in_flight(shape)
    final_in_flight = max_in_flight(shape, chunk=shape.num_model_chunks - 1)[pp - 1]
    layers_per_stage = model.num_layers // pp
    v = shape.num_model_chunks
    out = []
    for stage in range(pp):
        exits = [
            e for e in model.early_exit.exit_layer_nums if _virtual_stage(e, model.num_layers, pp, v) % pp == stage
        ]
        # Per in-flight forward: one chunk's layers (recompute units count a chunk's own).
        kept, buffer = _layer_activations(shape.recompute, layers_per_stage // v, layer_bytes, dtype * boundary)
        exit_norm = dtype * boundary * 3 if model.early_exit.use_exit_norm else 0.0
        # Without --recompute-exit-heads every exit's logits are saved together before the
        # backward; with it, one exit's logits exist at a time (its no-grad forward, then
        # its recomputation); a chunk's heads run in its own backward, apart from the others'.
        chunk_exits = max(
            sum(_virtual_stage(e, model.num_layers, pp, v) == c * pp + stage for e in exits) for c in range(v)
        )
        exit_heads = min(1, chunk_exits) if shape.recompute.exit_heads else chunk_exits
        has_head = stage == pp - 1 or exits
        ee = model.early_exit
        # An exit MLP keeps the layer MLP's saved tensors and its pre-MLP norm's; an exit block a layer's.
        exit_mlp = (
            dtype * ((k["mlp_gated"] if model.swiglu else k["mlp"]) * s * b * model.ffn_hidden_size / tp + 2 * boundary)
            if ee.use_exit_mlp
            else 0.0
        )
        exit_block = layer_bytes if ee.use_exit_block else 0.0
        # Teacher copy (params dtype) and fp32 log-probabilities, then each exit's KL keeps two
        # fp32 probability tensors: all of vocabulary size.
        distill = (
            logits * (dtype / 4 + 1) + exit_heads * 2 * logits
            if ee.exit_distill_weight > 0 and exits and stage == pp - 1
            else 0.0
        )
        terms = {
            "parameters": params[stage] * dtype,
            "gradients": params[stage] * 4,  # fp32 buffer (grad_reduce_in_fp32 in bf16/fp16)
            "optimizer state": params[stage] * (12 if half else 8) / (dp if shape.use_distributed_optimizer else 1),
            "activations": in_flight[stage] * kept,
            # The final norm's saved tensors (as a layer's norm) and the logits.
            "final logits": (logits + 3 * dtype * boundary) * final_in_flight if stage == pp - 1 else 0.0,
            "exit logits": exit_heads * (logits + exit_norm),
            "exit activations": exit_heads * (exit_mlp + exit_block),
            "distillation": distill,
            "loss buffer": logits if has_head else 0.0,  # the loss's shifted copy of the logits
            # A recomputed unit's activations, and the softmax gradient of unfused attention.
            "backward buffer": buffer + (2 * scores if k["scores"] else 0.0),
        }
        out.append(StageMemory(stage, layers_per_stage, exits, in_flight[stage], terms))
    return out


def _layer_activations(recompute: RecomputeConfig, num_layers: int, layer_bytes: float, input_bytes: float):
    """(kept per in-flight microbatch, buffer while one recomputed unit runs backward)."""
    kept, buffer = 0.0, 0.0
    for start, end, recomputed in recompute_units(
        num_layers, recompute.granularity, recompute.method, recompute.num_layers
    ):
        if recomputed:
            kept += input_bytes
            buffer = max(buffer, (end - start) * layer_bytes)
        else:
            kept += (end - start) * layer_bytes
    return kept, buffer


def format_table(stages: List[StageMemory], gpu_memory_gb: Optional[float] = None) -> str:
    """One row per stage, one column per term (GB), the total, the largest term and,
    given a GPU size, whether the stage fits."""
    names = list(stages[0].terms)
    header = ["stage", "layers", "exits", "in flight"] + names + ["total", "largest"]
    rows = [header]
    for st in stages:
        row = [str(st.stage), str(st.layers), " ".join(map(str, st.exits)) or "-", str(st.in_flight)]
        row += [f"{st.terms[n] / GB:.2f}" for n in names] + [f"{st.total / GB:.2f}", st.largest]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    worst = max(stages, key=lambda st: st.total)
    summary = f"largest per rank: stage {worst.stage}, {worst.total / GB:.2f} GB (largest term: {worst.largest})"
    if gpu_memory_gb is not None:
        margin = gpu_margin_gb(worst.total)
        verdict = "fits" if worst.total / GB + margin <= gpu_memory_gb else "does NOT fit"
        summary += (
            f"; {verdict} in {gpu_memory_gb:g} GB GPUs with a margin of {margin:.2f} GB (CUDA context and "
            f"communication buffers {CUDA_RESERVE_GB:g} GB, allocator fragmentation {ALLOCATOR_MARGIN:.0%})"
        )
    return "\n".join(lines + [summary])


def gpu_margin_gb(total_bytes: float) -> float:
    """What a GPU needs beyond the estimate (GB): see CUDA_RESERVE_GB, ALLOCATOR_MARGIN."""
    return CUDA_RESERVE_GB + ALLOCATOR_MARGIN * total_bytes / GB
