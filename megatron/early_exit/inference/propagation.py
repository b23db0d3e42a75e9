"""CALM's state propagation as one projection for all the layers a token skipped.

A token that leaves at depth d still owes every deeper layer its K/V, which state
propagation computes from the exit hidden state h: layer j's input norm, then the K and V
rows of its `linear_qkv`, then rotary on K. Layer by layer that is about a dozen small ops
per skipped layer, half of what running the layer costs a small model on CPU, which left
propagation far below the speedup its skipped layers promise.

Every deeper layer sees the same h, and its norm only scales the normalised h by its own
weight (RMSNorm: h / rms(h) * w_j; LayerNorm: (h - mean) / std * w_j + b_j), so the weight
folds into the projection: K_j = (W_kj diag(w_j)) h_hat (+ W_kj b_j + bias_kj). Stacking
those folded rows of layers d+1..L gives one matrix: one norm, one matmul, one rotary and
one cache write for all of them. `Propagator.build` returns None where a layout does not
allow it (Transformer Engine's fused norm, QK norms, fewer query groups than TP ranks,
mixed norms), and the decoder then goes layer by layer.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.identity_op import IdentityOp
from torch import Tensor


def _plain_norm(norm) -> Optional[Tuple[str, float]]:
    if isinstance(norm, torch.nn.RMSNorm) and norm.weight is not None:
        return "rms", norm.eps
    if isinstance(norm, torch.nn.LayerNorm) and norm.weight is not None:
        return "layer", norm.eps
    return None


class Propagator:
    """K/V of layers [first, n) of a stage from one hidden state."""

    def __init__(
        self,
        kind: str,
        eps: float,
        weight: Tensor,
        bias: Optional[Tensor],
        groups: int,
        head_dim: int,
        num_layers: int,
        interleaved: bool,
    ):
        self.kind, self.eps, self.weight, self.bias = kind, eps, weight, bias
        self.groups, self.head_dim, self.num_layers, self.interleaved = groups, head_dim, num_layers, interleaved

    @classmethod
    def build(cls, layers: List[torch.nn.Module], first: int) -> Optional["Propagator"]:
        deeper = layers[first:]
        if not deeper:
            return None
        norms = [_plain_norm(layer.input_layernorm) for layer in deeper]
        if None in norms or len(set(norms)) != 1:
            return None
        attention = deeper[0].self_attention
        if any(
            not isinstance(getattr(layer.self_attention, "k_layernorm", None), (type(None), IdentityOp))
            for layer in deeper
        ):
            return None
        if attention.config.num_query_groups < attention.world_size or attention.config.attention_output_gate:
            return None
        groups, head_dim = attention.num_query_groups_per_partition, attention.hidden_size_per_attention_head
        per_group = attention.num_attention_heads_per_partition // groups
        weights, biases = [], []
        for layer in deeper:
            linear, norm = layer.self_attention.linear_qkv, layer.input_layernorm
            w = linear.weight.view(groups, per_group + 2, head_dim, -1)[:, per_group:]  # [g, 2 (k, v), d, h]
            w = w.transpose(0, 1).reshape(2 * groups * head_dim, -1)  # rows: k of every group, then v
            b = None
            if linear.bias is not None:
                b = linear.bias.view(groups, per_group + 2, head_dim)[:, per_group:].transpose(0, 1).reshape(-1)
            if norms[0][0] == "layer" and norm.bias is not None:
                b = w @ norm.bias + (0 if b is None else b)
            weights.append(w * norm.weight)
            biases.append(b)
        bias = (
            None
            if all(b is None for b in biases)
            else torch.cat(
                [
                    b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
                    for b, w in zip(biases, weights)
                ]
            )
        )
        return cls(
            norms[0][0],
            norms[0][1],
            torch.cat(weights),
            bias,
            groups,
            head_dim,
            len(deeper),
            attention.config.rotary_interleaved,
        )

    def suffix(self, skip: int) -> "Propagator":
        """The propagator of the layers after the first `skip`: views of this one's rows."""
        rows = skip * 2 * self.groups * self.head_dim
        return Propagator(
            self.kind,
            self.eps,
            self.weight[rows:],
            None if self.bias is None else self.bias[rows:],
            self.groups,
            self.head_dim,
            self.num_layers - skip,
            self.interleaved,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)

    def __call__(self, hidden: Tensor, ws) -> Tuple[Tensor, Tensor]:
        """hidden [1, b, h] -> K, V [layers, 1, b, groups, head_dim] (rotary applied to K)."""
        from megatron.early_exit.inference.layers import apply_rotary

        shape = hidden.shape[-1:]
        normed = (
            F.rms_norm(hidden, shape, None, self.eps)
            if self.kind == "rms"
            else F.layer_norm(hidden, shape, None, None, self.eps)
        )
        kv = F.linear(normed, self.weight, self.bias)  # [1, b, layers * 2 * g * d]
        kv = kv.view(hidden.shape[1], self.num_layers, 2, self.groups, self.head_dim)  # [b, n, 2, g, d]
        k = apply_rotary(kv[:, :, 0].transpose(0, 1), ws, self.interleaved)  # [n, b, g, d]: positions broadcast over n
        return k.unsqueeze(1), kv[:, :, 1].transpose(0, 1).unsqueeze(1)


def _folded(layers: List[torch.nn.Module]) -> List[Tensor]:
    """The tensors a Propagator copies: each layer's QKV weight and bias, norm weight and bias."""
    modules = [m for layer in layers for m in (layer.self_attention.linear_qkv, layer.input_layernorm)]
    return [t for m in modules for t in (getattr(m, "weight", None), getattr(m, "bias", None)) if t is not None]


class Propagators:
    """One Propagator per exit depth, built on first use of state propagation (None where
    the layout needs the layer-by-layer path) and kept with the model: a decoder is built
    per `generate` call, the folded weights once. Their memory is the K/V rows of the QKV
    weights of the layers deeper than the shallowest exit that propagates (about 1.5 GB in
    bf16 for a 7B model propagating from layer 9 of 32), said in one line when built; a
    deeper exit's rows are a view of them. A weight changed since (in place or replaced)
    rebuilds them."""

    _ATTRIBUTE = "_early_exit_propagators"

    def __init__(self, model, layers: List[torch.nn.Module]):
        self.layers = layers
        self.built: Dict[int, Tuple[tuple, Optional[Propagator]]] = model.__dict__.setdefault(self._ATTRIBUTE, {})

    def _key(self, first: int) -> tuple:
        return tuple((id(t), t.data_ptr(), t._version) for t in _folded(self.layers[first:]))

    def at(self, first: int) -> Optional[Propagator]:
        key = self._key(first)
        if first not in self.built or self.built[first][0] != key:
            self.built[first] = (key, self._build(first))
        return self.built[first][1]

    def _build(self, first: int) -> Optional[Propagator]:
        for other, (key, shallower) in sorted(self.built.items()):
            if other < first and shallower is not None and key == self._key(other):
                return shallower.suffix(first - other)
        built = Propagator.build(self.layers, first)
        if built is None:
            return None
        for deeper, (key, _) in list(self.built.items()):  # deeper exits: views of the new rows
            if deeper > first and key == self._key(deeper):
                self.built[deeper] = (key, built.suffix(deeper - first))
        print(
            f"state propagation: folded K/V weights of this stage's layers {first + 1}-{len(self.layers)}, "
            f"{built.nbytes / 1e9:.3f} GB, kept with the model",
            flush=True,
        )
        return built
