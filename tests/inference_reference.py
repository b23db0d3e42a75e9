"""Slow references for the inference tests: no KV cache, the whole sequence every step
(tests/test_inference_reference.py checks them against the model's own forward).

Each step runs megatron-core's own layer forward (`_forward_attention`, `_forward_mlp`)
over the whole sequence and decides the last position's exit from the states it records.
For state propagation, a position that left at depth d keeps its depth-d hidden state in
every deeper layer (the layer's output is replaced by its input there), so deeper
layers' K/V of that position come from the exit state, as CALM defines. For
recomputation every position goes through every layer: a token that left early owes
deeper K/V that a later pass computes exactly as a full forward would.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from megatron.early_exit.inference.confidence import ExitView, get_confidence_measure


def _gather(logits):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits).float()


def layer_states(model, tokens: List[int], depths: Sequence[int], propagate: bool):
    """Hidden states after each depth (0 = embedding) and post-attention states, [s, h] each."""
    n, device = len(tokens), model.embedding.word_embeddings.weight.device
    ids = torch.tensor([tokens], device=device)
    x = model.embedding(input_ids=ids, position_ids=torch.arange(n, device=device).unsqueeze(0))
    rope = model.rotary_pos_emb(n) if model.position_embedding_type == "rope" else None
    states, attention = [x[:, 0]], [None]
    for i, layer in enumerate(model.decoder.layers):
        a, _ = layer._forward_attention(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
        y = layer._forward_mlp(a)
        if propagate:
            went_through = torch.tensor([d >= i + 1 for d in depths], device=device).view(-1, 1, 1)
            y = torch.where(went_through, y, x)
        x = y
        states.append(x[:, 0])
        attention.append(a[:, 0])
    return states, attention


def exit_logits_at(model, layer_number: int, states, attention, pos: int):
    head = model.exits[str(layer_number)]
    depth = layer_number - int(model.ee_config.pre_exit)
    layer = model.decoder.layers[layer_number - 1]
    hidden = states[depth][pos : pos + 1].unsqueeze(1)
    att = attention[layer_number][pos : pos + 1].unsqueeze(1) if head.has_mlp else None
    h = head.hidden(hidden, att, layer.pre_mlp_layernorm if head.has_mlp else None)
    return _gather(head.logits(h, model.exit_output_weight()))[0, 0], depth


@torch.no_grad()
def reference_generate(
    model,
    prompt: List[int],
    max_new_tokens: int,
    threshold: float = math.inf,
    measure: str = "max_prob",
    exit_layers: Optional[List[int]] = None,
    propagate: bool = False,
):
    """Greedy tokens, exit depths and log-probabilities (under the layer that chose each
    token); the first token is always full depth (the prefill)."""
    model.eval()
    num_layers = model.config.num_layers
    exits = sorted(int(k) for k in model.exits) if exit_layers is None else exit_layers
    conf = get_confidence_measure(measure)
    seq, depths = list(prompt), [num_layers] * len(prompt)
    tokens, exit_depths, logprobs = [], [], []
    for step in range(max_new_tokens):
        states, attention = layer_states(model, seq, depths, propagate)
        pos, chosen = len(seq) - 1, None
        for num in exits if step > 0 else []:
            logits, depth = exit_logits_at(model, num, states, attention, pos)
            if conf.projects:
                c = float(conf(ExitView.from_logits(logits.unsqueeze(0)))[0])
            elif depth == 0:
                c = -math.inf
            else:
                c = float(conf(ExitView(num, states[depth][pos : pos + 1], states[depth - 1][pos : pos + 1]))[0])
            if c >= threshold:
                chosen = (logits, depth)
                break
        if chosen is None:
            h = model.decoder.final_layernorm(states[-1][pos : pos + 1].unsqueeze(1))
            weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
            chosen = (_gather(model.output_layer(h, weight=weight)[0])[0, 0], num_layers)
        logits, depth = chosen
        token = int(logits.argmax())
        tokens.append(token)
        exit_depths.append(depth)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        depths[pos] = depth
        seq.append(token)
        depths.append(num_layers)
    return tokens, exit_depths, logprobs


@torch.no_grad()
def no_cache_greedy(model, prompt: List[int], max_new_tokens: int):
    """Full-depth greedy decoding that re-runs model(tokens, position_ids, None) on the
    whole prefix for every token; also the log-probability of each token."""
    model.eval()
    device = model.embedding.word_embeddings.weight.device
    seq, tokens, logprobs = list(prompt), [], []
    for _ in range(max_new_tokens):
        ids = torch.tensor([seq], device=device)
        logits = _gather(model(ids, torch.arange(len(seq), device=device).unsqueeze(0), None).final)[0, -1]
        t = int(logits.argmax())
        tokens.append(t)
        logprobs.append(float(torch.log_softmax(logits, -1)[t]))
        seq.append(t)
    return tokens, logprobs
