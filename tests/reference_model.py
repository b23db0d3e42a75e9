"""A hand-written, single-device early-exit GPT in plain PyTorch.

It reads the same full (TP=1) state dict as EarlyExitGPTModel and spells every
step out (RMSNorm, rotary embedding, grouped-query attention, SwiGLU, exit heads),
so that autograd through it is an independent check of the megatron-core model.
Tensors are [b, s, h] here.
"""

import math

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x, base=10000.0):
    """x: [b, s, heads, d]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(x.shape[1], dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
    return x * emb.cos() + rotate_half(x) * emb.sin()


def attention(x, p, cfg):
    b, s, _ = x.shape
    np_, ng = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    hn = cfg.hidden_size // np_
    qkv = (x @ p["self_attention.linear_qkv.weight"].T).view(b, s, ng, (np_ // ng + 2) * hn)
    q, k, v = qkv.split([np_ // ng * hn, hn, hn], dim=-1)
    q = rope(q.reshape(b, s, np_, hn))
    k, v = rope(k), v  # [b, s, ng, hn]
    k = k.repeat_interleave(np_ // ng, dim=2)
    v = v.repeat_interleave(np_ // ng, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hn)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, np_ * hn)
    return out @ p["self_attention.linear_proj.weight"].T


def mlp(x, p, prefix="mlp."):
    gate, up = (x @ p[prefix + "linear_fc1.weight"].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ p[prefix + "linear_fc2.weight"].T


def layer(x, p, cfg):
    """Returns (output, post-attention state)."""
    h = x + attention(rms_norm(x, p["input_layernorm.weight"]), p, cfg)
    return h + mlp(rms_norm(h, p["pre_mlp_layernorm.weight"]), p), h


def sub(state, prefix):
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def per_token_ce(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)


def reference_loss(state, cfg, ee, tokens, labels, loss_mask, iteration=0, tied_output=True):
    """Combined loss `final + sum_i w_i * exit_i` (masked token means), as a scalar."""
    mask = loss_mask.float()

    def mean(t):
        return (t * mask).sum() / mask.sum()

    emb = state["embedding.word_embeddings.weight"]
    x = emb[tokens]
    exit_inputs = {}
    for i in range(cfg.num_layers):
        num = i + 1
        p = sub(state, f"decoder.layers.{i}.")
        if ee.pre_exit and num in ee.exit_layer_nums:
            exit_inputs[num] = (x, None, p)
        x, h_attn = layer(x, p, cfg)
        if not ee.pre_exit and num in ee.exit_layer_nums:
            exit_inputs[num] = (x, h_attn, p)
    out_w = emb if tied_output else state["output_layer.weight"]
    final = per_token_ce(rms_norm(x, state["decoder.final_layernorm.weight"]) @ out_w.T, labels)
    total = mean(final)

    weights = ee.exit_weights(iteration)
    for idx, num in enumerate(ee.exit_layer_nums):
        h, h_attn, layer_p = exit_inputs[num]
        e = sub(state, f"exits.{num}.")
        if ee.use_exit_mlp:
            h = h_attn + mlp(rms_norm(h_attn, layer_p["pre_mlp_layernorm.weight"]), e)
        if ee.use_exit_block:
            h, _ = layer(h, sub(e, "block."), cfg)
        if ee.use_exit_norm:
            h = rms_norm(h, e["norm.weight"])
        w = e["output_layer.weight"] if ee.untie_exit_output_weights else emb
        logits = (h @ w.T) / ee.exit_layer_temperature[idx]
        token_loss = per_token_ce(logits, labels)
        if ee.use_dynamic_exit_layer_weight:
            token_loss = token_loss * logits.softmax(-1).max(-1).values.detach()
        total = total + weights[idx] * mean(token_loss)
    return total


def reference_grads(state, *args, **kwargs):
    params = {k: v.detach().clone().requires_grad_(True) for k, v in state.items()}
    loss = reference_loss(params, *args, **kwargs)
    loss.backward()
    return loss.detach(), {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in params.items()}
