"""State propagation in one projection equals the layer-by-layer K/V of every deeper layer."""

import pytest
import torch

from megatron.early_exit.config import EarlyExitConfig
from tests.helpers import build_ee_gpt, tiny_transformer_config

LAYOUTS = {
    "rmsnorm_gqa": dict(num_query_groups=2),
    "layernorm_biases": dict(normalization="LayerNorm", add_bias_linear=True, gated_linear_unit=False),
    "qkv_bias_only": dict(add_qkv_bias=True),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_one_projection_equals_each_layer(dist1, layout):
    from megatron.early_exit.inference.decoder import Decoder
    from megatron.early_exit.inference.layers import project_qkv
    from megatron.early_exit.inference.propagation import Propagator

    torch.manual_seed(0)
    model = build_ee_gpt(tiny_transformer_config(**LAYOUTS[layout]), EarlyExitConfig(exit_layer_nums=[1])).eval()
    with torch.no_grad():
        for layer in model.decoder.layers:  # norms away from their initial ones, biases away from 0
            for name, p in layer.named_parameters():
                if "norm" in name or "bias" in name:
                    p.add_(torch.randn_like(p) * 0.3)
        decoder = Decoder(model, 3, 16)
        ws = decoder._work_set([0, 2], [5, 9], [5, 9])
        hidden = torch.randn(1, 2, model.config.hidden_size)
        fused = Propagator.build(decoder.layers, 1)
        assert fused is not None
        k, v = fused(hidden, ws)
        for n, layer in enumerate(decoder.layers[1:]):
            _, k_ref, v_ref = project_qkv(layer, hidden, ws)
            assert torch.allclose(k[n], k_ref, atol=1e-5) and torch.allclose(v[n], v_ref, atol=1e-5), (layout, n)


def test_update_layers_writes_every_layer_from_first(dist1):
    from megatron.early_exit.inference.kv_cache import KVCache

    cache = KVCache(num_layers=4, max_batch=3, max_seq=8, num_kv_heads=2, head_dim=4)
    k = torch.randn(2, 1, 2, 2, 4)  # layers 2 and 3, one position, rows 0 and 2
    cache.update_layers(2, torch.tensor([0, 2]), torch.tensor([[3, 5]]), k, -k)
    assert torch.equal(cache.k[2][0, :, 3], k[0, 0, 0]) and torch.equal(cache.k[3][2, :, 5], k[1, 0, 1])
    assert torch.equal(cache.v[3][0, :, 3], -k[1, 0, 0])
    assert cache.k[0].abs().sum() == 0 and cache.k[1].abs().sum() == 0


def test_layouts_it_cannot_fold_go_layer_by_layer(dist1):
    from megatron.early_exit.inference.decoder import Decoder
    from megatron.early_exit.inference.propagation import Propagator

    model = build_ee_gpt(tiny_transformer_config(qk_layernorm=True), EarlyExitConfig(exit_layer_nums=[1])).eval()
    assert Propagator.build(Decoder(model, 1, 8).layers, 1) is None


def test_built_once_per_model_and_rebuilt_when_a_weight_changes(dist1):
    from megatron.early_exit.inference.decoder import Decoder

    model = build_ee_gpt(tiny_transformer_config(), EarlyExitConfig(exit_layer_nums=[1])).eval()
    first = Decoder(model, 1, 8).propagators.at(1)
    assert Decoder(model, 2, 16).propagators.at(1) is first  # a later decoder (generate call) reuses it
    with torch.no_grad():
        model.decoder.layers[2].input_layernorm.weight.mul_(2.0)
    rebuilt = Decoder(model, 1, 8).propagators.at(1)
    assert rebuilt is not first and not torch.equal(rebuilt.weight, first.weight)
