"""Decoding at TP=1 runs megatron-core's tensor-parallel linears as plain products (on CPU
against cached transposed weights): same outputs, and the modules get their own forward
back afterwards (even after an error)."""

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron.early_exit.inference import EarlyExit, FullDepth, generate
from megatron.early_exit.inference import context as plain_module
from megatron.early_exit.inference.context import plain_linears
from tests.inference_models import PROMPTS, build_model, fresh_model


def _linears(model):
    return [m for m in model.modules() if type(m) in (ColumnParallelLinear, RowParallelLinear)]


def test_plain_linears_compute_what_the_modules_compute(dist1):
    model = build_model("untied_mlp").eval()
    linears = _linears(model)
    assert len(linears) >= 4
    x = {id(m): torch.randn(3, 2, m.weight.shape[1]) for m in linears}
    with torch.no_grad():
        ref = {id(m): m(x[id(m)]) for m in linears}
        with plain_linears(model):
            assert all("forward" in m.__dict__ for m in linears)
            got = {id(m): m(x[id(m)]) for m in linears}
    for m in linears:
        (a, a_bias), (b, b_bias) = ref[id(m)], got[id(m)]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # another kernel: rounding only
        assert (a_bias is None) == (b_bias is None) and (a_bias is None or torch.equal(a_bias, b_bias))
    assert not any("forward" in m.__dict__ for m in linears)


def test_decoding_is_unchanged_and_modules_are_restored_after_errors(dist1):
    model = build_model("tied_norm")
    with torch.no_grad():
        # Reference logits of the modules' own forward, outside any decoding.
        tokens = torch.tensor([PROMPTS[2]])
        ref = model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None).final
    result = generate(model, PROMPTS, EarlyExit(0.4), max_new_tokens=5)
    full = generate(model, [PROMPTS[2]], FullDepth(), max_new_tokens=1)
    assert full.tokens[0][0] == int(ref[0, -1].argmax())
    assert len(result.tokens) == len(PROMPTS)
    with pytest.raises(RuntimeError):
        with plain_linears(model):
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in _linears(model))


def test_transposed_copies_follow_the_weights_and_can_be_turned_off(dist1, monkeypatch):
    model = fresh_model("tied_norm")  # its weight changes below: not the shared model
    layer = model.decoder.layers[0].mlp.linear_fc1
    x = torch.randn(2, 1, layer.weight.shape[1])
    with torch.no_grad(), plain_linears(model):
        before = layer(x)[0]
        first = plain_module.transposed(layer.weight)
        assert first is plain_module.transposed(layer.weight)  # built once
        assert torch.equal(first, layer.weight.t())
        layer.weight.mul_(2)  # a changed weight (an optimizer step) gets a new copy
        torch.testing.assert_close(layer(x)[0], 2 * before)
        assert plain_module.transposed(layer.weight) is not first
    monkeypatch.setenv("EE_CPU_TRANSPOSED_WEIGHTS", "0")  # read when a decoding block starts
    calls = []
    monkeypatch.setattr(plain_module, "transposed", lambda w: calls.append(w) or w.t())
    with torch.no_grad(), plain_linears(model):
        torch.testing.assert_close(layer(x)[0], 2 * before)
    assert calls == []  # turned off: plain F.linear
