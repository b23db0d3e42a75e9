"""The interleaved (virtual) pipeline: v model chunks per stage, scheduled as 1F1B over them.

With p stages and v chunks, layers are cut into p*v virtual stages of equal size; chunk c of
stage s holds virtual stage c*p + s (megatron-core's layout: `vp_stage` c). A microbatch
therefore visits every stage v times, and the links wrap around from stage p-1 to stage 0.

The order is megatron-core's interleaved 1F1B, as a plan (see plan.py):
  * forwards go through chunks in groups of p microbatches: microbatches 0..p-1 on chunk 0,
    then on chunk 1, ..., then microbatches p..2p-1 on chunk 0 and so on; backwards take the
    same sequence with the chunks reversed (the last chunk first);
  * stage s runs min(2*(p-1-s) + (v-1)*p, m*v) forwards first (warm-up), then pairs of one
    forward and one backward (steady state), then the remaining backwards (cool-down).
The bubble shrinks from (p-1)/(m+p-1) to about (p-1)/(v*m+p-1) of the step, at the price of
v times as many point-to-point messages and more activations in flight.

Exits live with their layer, so with the chunk that holds it; their losses are back-propagated
in that chunk's backward, lazily, as in the plain schedule. Bubble filling is EE-LLM's and is
defined for plain 1F1B only.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.errors import ConfigError
from megatron.early_exit.pipeline.plan import Action, _mark_replies

VIRTUAL_FLAG = "--num-layers-per-virtual-pipeline-stage"


def num_model_chunks(num_layers: int, num_stages: int, layers_per_virtual_stage: int) -> int:
    """v = layers / (p * N), refusing layouts that do not split evenly."""
    if layers_per_virtual_stage < 1:
        raise ConfigError(f"{VIRTUAL_FLAG} must be >= 1, got {layers_per_virtual_stage}")
    if num_stages < 2:
        raise ConfigError(f"{VIRTUAL_FLAG} needs --pipeline-model-parallel-size > 1, got {num_stages}")
    if num_layers % (num_stages * layers_per_virtual_stage):
        raise ConfigError(
            f"{VIRTUAL_FLAG} {layers_per_virtual_stage}: --num-layers ({num_layers}) must be divisible by "
            f"--pipeline-model-parallel-size ({num_stages}) x {layers_per_virtual_stage}"
        )
    chunks = num_layers // (num_stages * layers_per_virtual_stage)
    if chunks < 2:
        raise ConfigError(
            f"{VIRTUAL_FLAG} {layers_per_virtual_stage} gives one model chunk per stage "
            f"({num_layers} layers, {num_stages} stages): drop the flag or make it smaller"
        )
    return chunks


def check_num_microbatches(num_microbatches: int, num_stages: int) -> None:
    """Microbatches go through the chunks in groups of p; a last group smaller than p would
    leave stages waiting on each other (megatron-core refuses it too)."""
    if num_microbatches < 1 or num_microbatches % num_stages:
        raise ConfigError(
            f"{VIRTUAL_FLAG}: the number of microbatches per step ({num_microbatches} = --global-batch-size / "
            f"(--micro-batch-size x data-parallel size)) must be a multiple of --pipeline-model-parallel-size "
            f"({num_stages})"
        )


# ---------------------------------------------------------------------------
# Where layers and exits live
# ---------------------------------------------------------------------------


def layer_place(layer_number: int, num_layers: int, num_stages: int, num_chunks: int) -> Tuple[int, int]:
    """(stage, chunk) of a layer (1-based)."""
    virtual = (layer_number - 1) // (num_layers // (num_stages * num_chunks))
    return virtual % num_stages, virtual // num_stages


def exit_places(ee_config: EarlyExitConfig, num_layers: int, num_stages: int, num_chunks: int) -> List[Tuple[int, int]]:
    """(stage, chunk) of each exit."""
    return [layer_place(n, num_layers, num_stages, num_chunks) for n in ee_config.exit_layer_nums]


def tied_embedding_stages(
    ee_config: EarlyExitConfig, num_layers: int, num_stages: int, num_chunks: int, tied_output: bool
) -> List[int]:
    """Stages holding a copy of the word embedding in some chunk: the first (chunk 0), the last
    (its last chunk) when the output layer is tied to it, every stage with a tied exit."""
    stages = {0}
    if tied_output:
        stages.add(num_stages - 1)
    if not ee_config.untie_exit_output_weights:
        stages.update(s for s, _ in exit_places(ee_config, num_layers, num_stages, num_chunks))
    return sorted(stages)


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


def forward_order(num_microbatches: int, num_chunks: int, group: int) -> List[Tuple[int, int]]:
    """(microbatch, chunk) of every forward of a stage, in order: groups of `group`
    microbatches through chunk 0, then chunk 1, ...; the last group takes what is left."""
    order = []
    for start in range(0, num_microbatches, group):
        members = range(start, num_microbatches if start + group >= num_microbatches else start + group)
        order += [(j, c) for c in range(num_chunks) for j in members]
    return order


def interleaved_one_f_one_b(num_stages: int, stage: int, num_microbatches: int, num_chunks: int) -> List[Action]:
    """The action list of one stage."""
    p, s, v = num_stages, stage, num_chunks
    check_num_microbatches(num_microbatches, p)
    order = forward_order(num_microbatches, v, p)
    total = len(order)

    def forward(k):
        j, c = order[k]
        return Action("F", ("R", j), recv=(s, c) != (0, 0), send=(s, c) != (p - 1, v - 1), chunk=c, ring=p)

    def backward(k, paired=False):
        j, c = order[k][0], v - 1 - order[k][1]  # the last chunk back-propagates first
        return Action(
            "B", ("R", j), recv=(s, c) != (p - 1, v - 1), send=(s, c) != (0, 0), chunk=c, ring=p, with_previous=paired
        )

    warmup = min(2 * (p - 1 - s) + (v - 1) * p, total)
    actions = [forward(k) for k in range(warmup)]  # warm-up
    for k in range(total - warmup):  # steady state: one forward, one backward
        actions += [forward(warmup + k), backward(k, paired=True)]
    actions += [backward(k) for k in range(total - warmup, total)]  # cool-down
    return actions


def interleaved_plan(num_stages: int, num_microbatches: int, num_chunks: int) -> List[List[Action]]:
    return _mark_replies(
        [interleaved_one_f_one_b(num_stages, s, num_microbatches, num_chunks) for s in range(num_stages)]
    )


def chunk_costs(stage_costs: Sequence[float], num_chunks: int) -> List[float]:
    """Per virtual stage costs for `simulate`: each chunk does 1/v of its stage's work."""
    p = len(stage_costs)
    return [stage_costs[u % p] / num_chunks for u in range(p * num_chunks)]


# ---------------------------------------------------------------------------
# A stage's model chunks as one model
# ---------------------------------------------------------------------------


class ModelChunks(torch.nn.Module):
    """The model chunks of one stage (each DDP-wrapped or not), seen as one model where the
    trainer and checkpoints need one: gradient buffers, parameter sync, train/eval, and a
    sharded state dict merging the chunks' (their tensors keep megatron-core's global layer
    keys, so a checkpoint loads into any number of chunks, or none)."""

    def __init__(self, chunks: Sequence[torch.nn.Module]):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)
        inner = _unwrap(chunks[0])
        self.model_config = getattr(inner, "model_config", None)  # what checkpoints store
        self.vocab_size = inner.vocab_size

    @property
    def config(self):
        return self.chunks[0].config

    @property
    def ddp_config(self):
        return self.chunks[0].ddp_config

    def zero_grad_buffer(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()

    def start_param_sync(self, *args, **kwargs) -> None:
        for chunk in self.chunks:
            chunk.start_param_sync(*args, **kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        state = {}
        for c, chunk in enumerate(self.chunks):
            local = f"chunks.{c}." + "module." * _depth(chunk)  # where load_state_dict finds the chunk's tensors
            state.update(
                {local + k: v for k, v in _unwrap(chunk).sharded_state_dict(prefix, sharded_offsets, metadata).items()}
            )
        return state


def model_chunks(model) -> List[torch.nn.Module]:
    """A stage's chunks: those of a ModelChunks, else the model alone."""
    return list(model.chunks) if isinstance(model, ModelChunks) else [model]


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _depth(model) -> int:
    depth = 0
    while hasattr(model, "module"):
        model, depth = model.module, depth + 1
    return depth
