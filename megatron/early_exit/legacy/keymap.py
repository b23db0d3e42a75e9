"""Legacy tensor names -> ours, and how their tensor-parallel shards join.

Key map. Legacy names are those of `model` flattened with dots, after `language_model.`;
`encoder.` is `transformer.` in the oldest files. Layer numbers are local to a pipeline stage:
stage p holds layers p*L/PP + 1 .. (p+1)*L/PP. Sharding over tensor-parallel ranks: col
(ColumnParallelLinear, VocabParallelEmbedding: concatenated on dim 0), row (RowParallelLinear:
dim 1; its bias is whole on every rank), rep (whole on every rank: norms, position embedding).
Sources: Megatron-LM `megatron/model/language_model.py` (Embedding, TransformerLanguageModel),
`megatron/model/transformer.py` (ParallelTransformerLayer, ParallelAttention, ParallelMLP,
ParallelTransformer), and EE-LLM's versions of both plus `megatron/model/early_exit_gpt_model.py`
(EarlyExitTransformerLayer, ExitMLP, EarlyExitTransformerLanguageModel).

    legacy (after language_model.)                     ours                                    TP
    embedding.word_embeddings.weight                   embedding.word_embeddings.weight        col
    embedding.position_embeddings.weight               embedding.position_embeddings.weight    rep
    encoder.layers.j.input_norm.*  (EE-LLM; Megatron-LM
        before its 2023 rename: input_layernorm.*)     decoder.layers.i.input_layernorm.*      rep
    encoder.layers.j.self_attention.query_key_value.*  decoder.layers.i.self_attention.linear_qkv.*  col (qkv)
    encoder.layers.j.self_attention.dense.*            decoder.layers.i.self_attention.linear_proj.*  row
    encoder.layers.j.post_attention_norm.*
        (post_attention_layernorm.*)                   decoder.layers.i.pre_mlp_layernorm.*    rep
    encoder.layers.j.mlp.dense_h_to_4h.*               decoder.layers.i.mlp.linear_fc1.*       col (glu with --swiglu)
    encoder.layers.j.mlp.dense_4h_to_h.*               decoder.layers.i.mlp.linear_fc2.*       row
    encoder.final_norm.* (final_layernorm.*)           decoder.final_layernorm.*               rep
    output_layer.weight (untied embeddings)            output_layer.weight                     col
  EE-LLM's exits, of the layer numbered n = i + 1 (EarlyExitTransformerLayer):
    encoder.layers.j.mlp.trunk.*   (--use-exit-mlp)    decoder.layers.i.mlp.*  (the layer's own MLP)
    encoder.layers.j.mlp.branch.*  (--use-exit-mlp)    exits.n.mlp.*
    encoder.layers.j.exit_norm.*   (--use-exit-norm)   exits.n.norm.*                          rep
    encoder.layers.j.exit_block.*  (--use-exit-block)  exits.n.block.*  (a layer, as above)
    exit_output_layer.k.weight (--untie-exit-output-weights; k: the k-th exit of this stage,
        in --exit-layer-nums order)                    exits.n.output_layer.weight             col
    word_embeddings_for_head.weight: the copy of the word embedding that the last stage and
        stages with tied exits keep (Megatron-LM MegatronModule.initialize_word_embeddings,
        EE-LLM parallel_state's embedding group): not converted, ours are tied by name.

qkv: each rank's rows are [query groups of the rank, (heads per group + 2), head dim] (query
heads of the group, then its key and value head), megatron-core's linear_qkv layout: checkpoint
versions 2 and 3 (without grouped-query attention a group is one head: [heads, 3, head dim]).
Versions 0 ([3, heads, head dim]) and 1 ([heads, head dim, 3]) are reordered first
(Megatron-LM `fix_query_key_value_ordering`). glu (SwiGLU's dense_h_to_4h): each rank holds
its share of the gate rows then its share of the up rows; ours is all gate rows, then all up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron.early_exit.hf.errors import ConversionError

_NORMS = {
    "input_norm": "input_layernorm",
    "input_layernorm": "input_layernorm",
    "post_attention_norm": "pre_mlp_layernorm",
    "post_attention_layernorm": "pre_mlp_layernorm",
}
_ATTENTION = {"query_key_value": ("linear_qkv", "qkv"), "dense": ("linear_proj", "row")}
_MLP = {"dense_h_to_4h": ("linear_fc1", "fc1"), "dense_4h_to_h": ("linear_fc2", "row")}
# Tensors that hold nothing to convert: the tied embedding's copy, TE state, RoPE's buffer.
IGNORED = re.compile(r"^word_embeddings_for_head\.weight$|_extra_state$|rotary_pos_emb\.inv_freq$")


@dataclass(frozen=True)
class Target:
    name: str  # our parameter
    kind: str  # rep, col, row, qkv, fc1 (glu with SwiGLU, else col): how its TP shards join


def _sharding(kind: str, param: str) -> str:
    """Biases of row-parallel layers are whole on every rank."""
    return "rep" if kind == "row" and param == "bias" else kind


def _mlp_target(rest: str, prefix: str) -> Optional[Target]:
    module, _, param = rest.partition(".")
    if module not in _MLP:
        return None
    ours, kind = _MLP[module]
    return Target(f"{prefix}.{ours}.{param}", _sharding(kind, param))


def _layer_target(rest: str, prefix: str) -> Optional[Target]:
    """A transformer layer's own tensor (`rest` after `layers.j.`), under our `prefix`."""
    module, _, param = rest.partition(".")
    if module in _NORMS:
        return Target(f"{prefix}.{_NORMS[module]}.{param}", "rep")
    if module == "self_attention":
        linear, _, param = param.partition(".")
        if linear in _ATTENTION:
            ours, kind = _ATTENTION[linear]
            return Target(f"{prefix}.self_attention.{ours}.{param}", _sharding(kind, param))
    if module == "mlp":
        return _mlp_target(param, f"{prefix}.mlp")
    return None


def _exit_target(rest: str, layer: int) -> Optional[Target]:
    """EE-LLM's exit tensors inside the layer numbered `layer` (and its ExitMLP trunk)."""
    head = f"exits.{layer}"
    for legacy, ours in (("mlp.trunk.", f"decoder.layers.{layer - 1}.mlp"), ("mlp.branch.", f"{head}.mlp")):
        if rest.startswith(legacy):
            return _mlp_target(rest[len(legacy) :], ours)
    if rest.startswith("exit_norm."):
        return Target(f"{head}.norm.{rest[len('exit_norm.') :]}", "rep")
    if rest.startswith("exit_block."):
        return _layer_target(rest[len("exit_block.") :], f"{head}.block")
    return None


def legacy_target(key: str, first_layer: int, stage_exits: List[int]) -> Optional[Target]:
    """Our tensor for legacy `key` (flattened, after `language_model.`) of a stage whose first
    layer is `first_layer` (0-based) and whose exits are `stage_exits`; None: not known."""
    key = re.sub(r"^transformer\.", "encoder.", key)
    if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return Target(key, "col")
    if key == "embedding.position_embeddings.weight":
        return Target(key, "rep")
    final = re.match(r"^encoder\.(?:final_norm|final_layernorm)\.(\w+)$", key)
    if final:
        return Target(f"decoder.final_layernorm.{final.group(1)}", "rep")
    head = re.match(r"^exit_output_layer\.(\d+)\.weight$", key)
    if head:
        index = int(head.group(1))
        return Target(f"exits.{stage_exits[index]}.output_layer.weight", "col") if index < len(stage_exits) else None
    layer = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", key)
    if not layer:
        return None
    number, rest = first_layer + int(layer.group(1)) + 1, layer.group(2)
    return _exit_target(rest, number) or _layer_target(rest, f"decoder.layers.{number - 1}")


# -- joining the shards ----------------------------------------------------------------------


def qkv_in_version_3(shard: torch.Tensor, version: float, heads_per_rank: int, head_dim: int) -> torch.Tensor:
    """A rank's query_key_value rows in the [heads, 3, head dim] order of versions 2 and 3."""
    if version >= 2:
        return shard
    rest = shard.shape[1:]
    if version == 0:  # [3, heads, head dim]
        return shard.view(3, heads_per_rank, head_dim, *rest).transpose(0, 1).reshape(shard.shape)
    if version == 1:  # [heads, head dim, 3]
        return shard.view(heads_per_rank, head_dim, 3, *rest).transpose(1, 2).reshape(shard.shape)
    raise ConversionError(f"checkpoint_version {version} is not a Megatron-LM checkpoint version (0, 1, 2 or 3)")


def join_shards(kind: str, shards: List[torch.Tensor]) -> torch.Tensor:
    """The whole tensor from its TP shards (rank order): rep, col, row, qkv (as col) or glu."""
    if kind == "rep":
        return shards[0]
    if kind == "row":
        return torch.cat(shards, dim=1)
    if kind == "glu":  # each rank: [its gate rows; its up rows]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)
