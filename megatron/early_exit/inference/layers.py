"""The model's own modules, run on a batch of (row, position) entries against the KV cache.

Everything here calls megatron-core's modules of the EarlyExitGPTModel (embedding, norms,
`linear_qkv` through `get_query_key_value_tensors`, `linear_proj`, the bias-dropout-add,
the MLP, exit heads, output layer) and replaces only the core attention, which reads
keys and values from the cache. Rotary embedding uses megatron-core's unfused formula
with cos/sin tables computed once from the model's own frequencies.

A `WorkSet` says which entries one batched call processes: for each cache row, a run of
consecutive positions [start, end]. Rows are right-aligned in a [c, b] grid, so every
row's newest token sits at index c - 1 and shorter rows are padded at the front;
padding entries compute garbage that is never written to the cache or returned. When
the rows' runs differ in length (tokens that left early owe deeper layers their K/V), a
layer's projections and MLP run on the real entries only (`Packing`), and only attention
on the grid: otherwise one owed position in one row would double every row's work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import _rotate_half
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch import Tensor

from megatron.early_exit.models.layer_specs import pre_mlp_norm


@dataclass
class Packing:
    """The real entries of a grid with padding, as a flat list of N."""

    index: Tensor  # [N] their places in the grid flattened to [c * b]
    rows: Tensor  # [N] cache row of each
    write_pos: Tensor  # [1, N] position of each
    cos: Optional[Tensor]  # [N, 1, 1, rotary_dim]
    sin: Optional[Tensor]


@dataclass
class WorkSet:
    rows: List[int]
    starts: List[int]
    ends: List[int]
    rows_t: Tensor  # [b] cache rows
    row_slice: Optional[slice]  # the same rows as a slice when they are consecutive
    pos: Tensor  # [c, b] position of each entry (padding repeats the row's start)
    write_pos: Tensor  # [c, b] where each entry's K/V go (padding: the cache's trash slot)
    num_keys: int  # L: keys 0..L-1 of every row are read
    mask: Optional[Tensor]  # [b, 1, c, L] key j is visible to entry (c, b) iff j <= pos[c, b]
    causal: bool  # no mask needed: plain causal (a prefill from 0) or every key visible (c == 1)
    cos: Optional[Tensor]  # [c, b, 1, rotary_dim]
    sin: Optional[Tensor]
    packing: Optional[Packing] = None  # when some rows are padded

    @property
    def width(self) -> int:
        return self.pos.shape[0]

    @property
    def widths(self) -> List[int]:
        return [e - s + 1 for s, e in zip(self.starts, self.ends)]


class RotaryTables:
    """cos/sin of the model's rotary frequencies, per position [max_seq, rotary_dim]."""

    def __init__(self, model, max_seq: int, dtype: torch.dtype):
        freqs = model.rotary_pos_emb(max_seq).view(max_seq, -1)  # [s, 1, 1, d] -> [s, d]
        self.cos, self.sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
        self.interleaved = model.config.rotary_interleaved


def to_device(device, *values: List[int]) -> List[Tensor]:
    """Integer lists as int64 tensors on `device`, in one copy that does not wait for the
    device (pinned memory, non-blocking): `torch.tensor(list, device=cuda)` would."""
    flat = torch.tensor([v for part in values for v in part], dtype=torch.int64)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return list(flat.split([len(part) for part in values]))


def build_work_set(
    rows: List[int], starts: List[int], ends: List[int], trash_slot: int, rotary: Optional[RotaryTables], device
) -> WorkSet:
    widths = [e - s + 1 for s, e in zip(starts, ends)]
    width, b = max(widths), len(rows)
    # Row i's real entries sit at the last widths[i] grid indices of its column (host-side: no sync).
    real = [(width - w + j) * b + i for i, w in enumerate(widths) for j in range(w)] if min(widths) < width else []
    rows_t, starts_t, ends_t, real_t = to_device(device, rows, starts, ends, real)
    pos = ends_t.view(1, -1) + torch.arange(1 - width, 1, device=device).view(-1, 1)  # [c, b]
    padding = pos < starts_t.view(1, -1)
    write_pos = torch.where(padding, trash_slot, pos)
    pos = torch.where(padding, starts_t.view(1, -1), pos)
    num_keys = max(ends) + 1
    # Without an explicit mask SDPA may pick its flash or memory-efficient kernels.
    same_end = all(e == ends[0] for e in ends)
    causal = same_end and (width == 1 or all(s == 0 for s in starts))
    mask = None
    if not causal:
        keys = torch.arange(num_keys, device=device)
        mask = (keys.view(1, 1, -1) <= pos.t().unsqueeze(-1)).unsqueeze(1)  # [b, 1, c, L]
    consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
    cos = sin = None
    if rotary is not None:
        cos, sin = rotary.cos[pos].unsqueeze(2), rotary.sin[pos].unsqueeze(2)
    packing = None
    if real:
        packing = Packing(
            real_t,
            rows_t.view(1, -1).expand_as(pos).reshape(-1)[real_t],
            pos.reshape(1, -1)[:, real_t],
            None if cos is None else cos.reshape(-1, 1, 1, cos.shape[-1])[real_t],
            None if sin is None else sin.reshape(-1, 1, 1, sin.shape[-1])[real_t],
        )
    return WorkSet(
        rows,
        starts,
        ends,
        rows_t,
        slice(rows[0], rows[0] + len(rows)) if consecutive else None,
        pos,
        write_pos,
        num_keys,
        mask,
        causal,
        cos,
        sin,
        packing,
    )


def apply_rotary(t: Tensor, ws: WorkSet, interleaved: bool, cos=None, sin=None) -> Tensor:
    """megatron-core's `_apply_rotary_pos_emb_bshd` (mscale 1) with per-entry positions
    (the work set's, or `cos`/`sin` given)."""
    cos, sin = (ws.cos, ws.sin) if cos is None else (cos, sin)
    if cos is None:
        return t
    rot_dim = cos.shape[-1]
    if rot_dim == t.shape[-1]:  # the usual rotary_percent 1: no pass-through part to split off
        return (t * cos) + (_rotate_half(t, interleaved) * sin)
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    t = (t * cos) + (_rotate_half(t, interleaved) * sin)
    return torch.cat((t, t_pass), dim=-1)


def embed(model, tokens: Tensor, ws: WorkSet) -> Tensor:
    """tokens [c, b] (padding entries hold any valid id) -> hidden states [c, b, h]."""
    return model.embedding(input_ids=tokens.t(), position_ids=ws.pos.t())


def attention_scale(layer) -> float:
    core = layer.self_attention.core_attention
    scale = getattr(core, "softmax_scale", None)
    if scale is None:
        return layer.self_attention.hidden_size_per_attention_head**-0.5
    # With query-key layer scaling, megatron-core's own attention divides the scale by the
    # layer number and multiplies it back inside the softmax; Transformer Engine's keeps the
    # full scale (it applies the layer number inside its fp16 kernel only).
    divided = isinstance(core, DotProductAttention) and layer.config.apply_query_key_layer_scaling
    return scale * layer.layer_number if divided else scale


def project_qkv(layer, hidden: Tensor, ws: WorkSet, cos=None, sin=None) -> Tuple[Tensor, Tensor, Tensor]:
    """input_layernorm + linear_qkv (+ rotary on q and k): [c, b, heads/tp, head_dim] each.
    Under TE's layout `input_layernorm` is an IdentityOp and `linear_qkv` applies the norm."""
    q, k, v = layer.self_attention.get_query_key_value_tensors(layer.input_layernorm(hidden), None)
    interleaved = layer.config.rotary_interleaved
    return apply_rotary(q, ws, interleaved, cos, sin), apply_rotary(k, ws, interleaved, cos, sin), v


def run_layer(layer, x: Tensor, ws: WorkSet, cache, index: int, scale: float) -> Tuple[Tensor, Tensor]:
    """One transformer layer over the work set, writing its K/V to layer `index` of the cache.

    Returns (layer output, post-attention state), both [c, b, h].
    """
    c, b, _ = x.shape
    packing = ws.packing
    if packing is None:
        q, k, v = project_qkv(layer, x, ws)
        cache.update(index, ws.rows_t, ws.write_pos, k, v)
        residual = x
    else:  # the real entries only, as a sequence of N: [N, 1, ...]
        residual = x.reshape(c * b, -1).index_select(0, packing.index).unsqueeze(1)
        q, k, v = project_qkv(layer, residual, ws, packing.cos, packing.sin)
        cache.update(index, packing.rows, packing.write_pos, k.transpose(0, 1), v.transpose(0, 1))
        q = _to_grid(q.squeeze(1), packing, c, b)
    keys, values = cache.keys_values(index, ws.rows_t, ws.num_keys, ws.row_slice)
    context = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3),
        keys,
        values,  # [b, heads, c|L, d]
        attn_mask=ws.mask,
        is_causal=ws.causal and ws.width > 1,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    context = context.permute(2, 0, 1, 3).reshape(c, b, -1)  # [c, b, heads * d]
    if packing is not None:
        context = context.reshape(c * b, -1).index_select(0, packing.index).unsqueeze(1)
    bda = layer.self_attn_bda(False, layer.config.bias_dropout_fusion)
    attention_output = bda(layer.self_attention.linear_proj(context), residual, layer.hidden_dropout)
    out = layer._forward_mlp(attention_output)
    if packing is None:
        return out, attention_output
    return _to_grid(out.squeeze(1), packing, c, b), _to_grid(attention_output.squeeze(1), packing, c, b)


def _to_grid(t: Tensor, packing: Packing, c: int, b: int) -> Tensor:
    """Packed entries [N, ...] back into a [c, b, ...] grid (zeros at the padding)."""
    grid = t.new_zeros((c * b,) + t.shape[1:])
    return grid.index_copy_(0, packing.index, t).view((c, b) + t.shape[1:])


def gather_vocab(logits: Tensor) -> Tensor:
    """Vocab-parallel logits [.., v/tp] -> full-vocabulary float32 logits on every TP rank."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:  # no autograd Function for nothing
        return logits.float()
    return gather_from_tensor_model_parallel_region(logits).float()


def block_exit_logits(model, head, block_output: Tensor) -> Tensor:
    """An exit with a block (--use-exit-block) on its block's output [c, b, h] (the decoder runs
    the block over its own KV cache) -> [c, b, vocab]."""
    return mask_padded_vocab(model, gather_vocab(head.logits(head.norm(block_output), model.exit_output_weight())))


def exit_logits(model, head, layer, hidden: Tensor, attention_output: Optional[Tensor]) -> Tensor:
    """The exit head at `layer` on hidden [c, b, h] -> [c, b, vocab]."""
    h = head.hidden(hidden, attention_output, pre_mlp_norm(layer) if head.has_mlp else None)
    return mask_padded_vocab(model, gather_vocab(head.logits(h, model.exit_output_weight())))


def final_logits(model, hidden: Tensor) -> Tensor:
    """Final norm and output layer on hidden [c, b, h] -> [c, b, vocab]."""
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(model.decoder.final_layernorm(hidden), weight=weight)
    return mask_padded_vocab(model, gather_vocab(logits))


def scoring_vocab_size(model, vocab_size: Optional[int] = None) -> int:
    """Ids below this are real tokens: `vocab_size` when given, else the size of the tokenizer
    the model's description names (built once, remembered on the model), else the (padded)
    embedding size."""
    if vocab_size is None:
        vocab_size = getattr(model, "tokenizer_vocab_size", None)
    if vocab_size is None:
        vocab_size = _described_tokenizer_vocab(model)
        model.tokenizer_vocab_size = vocab_size or model.vocab_size
    return min(int(vocab_size), model.vocab_size) if vocab_size else model.vocab_size


def _described_tokenizer_vocab(model) -> Optional[int]:
    tokenizer = getattr(getattr(model, "model_config", None), "tokenizer", None)
    if tokenizer is None or tokenizer.type is None:
        return None
    if tokenizer.vocab_size is not None:  # NullTokenizer: the size is the description
        return int(tokenizer.vocab_size)
    from megatron.early_exit.errors import EarlyExitError

    try:
        return tokenizer.build().vocab_size
    except (EarlyExitError, OSError):  # files moved since loading: score over the whole embedding
        return None


PADDED_LOGIT = -1e30  # exp() gives exactly 0, yet finite: p * log p stays 0 in an entropy


def mask_padded_vocab(model, logits: Tensor) -> Tensor:
    """Rows the embedding holds only as padding (ids >= the tokenizer's vocabulary) get a
    logit no strategy can pick, sample or count as confidence: every decoded token and
    every exit test reads its logits from here."""
    real = scoring_vocab_size(model)
    if real >= logits.shape[-1]:
        return logits
    if torch.is_grad_enabled() and logits.requires_grad:
        return torch.cat([logits[..., :real], logits[..., real:].detach().fill_(PADDED_LOGIT)], dim=-1)
    logits[..., real:] = PADDED_LOGIT
    return logits
