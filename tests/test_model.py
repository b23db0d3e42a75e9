"""EarlyExitGPTModel, exit heads and the loss, in one process."""

import pytest
import torch

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.errors import ConfigError
from tests.helpers import HEADS, build_ee_gpt, build_gpt, ee_loss_and_grads, make_batch, tiny_transformer_config
from tests.reference_model import reference_grads


def test_no_exit_model_equals_gpt_model_bitwise(dist1):
    from megatron.early_exit.sharding import full_state_dict
    from tests.helpers import load_full_state_dict

    config = tiny_transformer_config()
    gpt = build_gpt(config)
    ee = build_ee_gpt(config, EarlyExitConfig())
    assert [n for n, _ in gpt.named_parameters()] == [n for n, _ in ee.named_parameters()]
    load_full_state_dict(ee, full_state_dict(gpt))
    tokens, labels, pos = make_batch()
    assert torch.equal(gpt(tokens, pos, None), ee(tokens, pos, None).final)  # logits
    gpt_loss = gpt(tokens, pos, None, labels=labels)
    ee_loss = ee(tokens, pos, None, labels=labels).final
    assert torch.equal(gpt_loss, ee_loss)
    gpt_loss.sum().backward()
    ee_loss.sum().backward()
    for (name, a), (_, b) in zip(gpt.named_parameters(), ee.named_parameters()):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("tied_output", [True, False], ids=["tied_model", "untied_model"])
@pytest.mark.parametrize("head", list(HEADS))
def test_gradients_match_handwritten_reference(dist1, head, tied_output):
    from megatron.early_exit.sharding import full_state_dict

    torch.manual_seed(0)
    ee_config = EarlyExitConfig(exit_layer_nums=[1, 3], exit_layer_weight=[0.3, 0.7], **HEADS[head])
    config = tiny_transformer_config(num_query_groups=2)  # grouped-query attention
    model = build_ee_gpt(config, ee_config, tied=tied_output)
    state = full_state_dict(model)
    batch = make_batch(seed=4)
    loss_mask = (torch.rand(batch[1].shape) > 0.2).float()
    loss, grads, report = ee_loss_and_grads(model, ee_config, batch, loss_mask)
    ref_loss, ref_grads = reference_grads(
        state, config, ee_config, batch[0], batch[1], loss_mask, tied_output=tied_output
    )
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    # Every exit parameter receives gradient, and losses are reported per exit.
    assert all(grads[n].abs().sum() > 0 for n in grads if n.startswith("exits."))
    assert sorted(report.exit_losses) == [1, 3] and report.exit_weights == {1: 0.3, 3: 0.7}


def test_exit_with_zero_weight_is_logged_without_gradient(dist1):
    ee_config = EarlyExitConfig(
        exit_layer_nums=[2],
        exit_layer_weight=[1.0],
        exit_layer_weight_init=[0.0],
        exit_layer_weight_warmup_iters=10,
        untie_exit_output_weights=True,
    )
    model = build_ee_gpt(tiny_transformer_config(), ee_config)
    _, grads, report = ee_loss_and_grads(model, ee_config, make_batch(), iteration=0)
    assert report.exit_weights == {2: 0.0} and report.exit_losses[2] > 0
    assert "exits.2.output_layer.weight" not in grads  # untouched by backward
    _, grads, report = ee_loss_and_grads(model, ee_config, make_batch(), iteration=5)
    assert report.exit_weights == {2: 0.5} and grads["exits.2.output_layer.weight"].abs().sum() > 0


def test_exit_heads_are_lazy(dist1):
    """The forward pass runs no exit head: heads run when their loss is asked for."""
    ee_config = EarlyExitConfig(exit_layer_nums=[2], untie_exit_output_weights=True)
    model = build_ee_gpt(tiny_transformer_config(), ee_config)
    calls = []
    model.exits["2"].output_layer.register_forward_hook(lambda *a: calls.append(1))
    tokens, labels, pos = make_batch()
    out = model(tokens, pos, None, labels=labels)
    assert calls == [] and [e.layer_number for e in out.exits] == [2]
    out.exits[0].compute_loss(False)
    assert calls == [1]


def test_layer_dropout_skips_the_dropped_layers_compute(dist1):
    """Each sequence skips each layer with its LayerSkip probability: the skipped rows never
    enter the layer, and every row's loss is the model's without the layers it skipped."""
    ee_config = EarlyExitConfig(layer_dropout_max=0.5)
    model = build_ee_gpt(tiny_transformer_config(), ee_config)
    assert model.layer_dropout_probs() == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])
    tokens, labels, pos = make_batch(batch=8)
    rows_run = []
    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs: rows_run.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
        )
    keep = model.layer_dropout_keep(0, 8)
    assert keep == model.layer_dropout_keep(0, 8) and keep != model.layer_dropout_keep(1, 8)  # seeded by the step
    model.train()
    got = model(tokens, pos, None, labels=labels).final
    assert model.layer_dropout_step == 1
    assert rows_run == [len(keep[n]) for n in range(1, 5) if keep[n]]  # the dropped rows' compute is skipped
    assert len(keep[1]) == 8 and any(0 < len(rows) < 8 for rows in keep.values())
    model.eval()
    layers = model.decoder.layers
    for i in range(8):
        model.decoder.layers = torch.nn.ModuleList([layer for layer in layers if i in keep[layer.layer_number]])
        want = model(tokens[i : i + 1], pos[i : i + 1], None, labels=labels[i : i + 1]).final[0]
        assert torch.allclose(got[i], want, atol=1e-5), i
    model.decoder.layers = layers


# -- configuration -----------------------------------------------------------


@pytest.mark.parametrize(
    "style,iteration,expected",
    [
        ("linear", 0, [0.1, 0.0]),
        ("linear", 25, [0.1 + 0.25 * 0.9, 0.125]),
        ("linear", 100, [1.0, 0.5]),
        ("linear", 1000, [1.0, 0.5]),
        ("cosine", 0, [0.1, 0.0]),
        ("cosine", 25, [0.1 + 0.5 * (1 - 2**-0.5) * 0.9, 0.5 * (1 - 2**-0.5) * 0.5]),
        ("cosine", 50, [0.55, 0.25]),
        ("cosine", 100, [1.0, 0.5]),
    ],
)
def test_weight_schedule(style, iteration, expected):
    config = EarlyExitConfig(
        exit_layer_nums=[2, 4],
        exit_layer_weight=[1.0, 0.5],
        exit_layer_weight_init=[0.1, 0.0],
        exit_layer_weight_warmup_iters=100,
        exit_layer_weight_warmup_style=style,
    )
    assert config.exit_weights(iteration) == pytest.approx(expected)


def test_curricula():
    rot = EarlyExitConfig(exit_layer_nums=[1, 2, 3], exit_curriculum="rotational", exit_curriculum_rotation=2)
    assert rot.active_exits(0) == [True, False, True]
    assert rot.active_exits(1) == [False, True, False]
    assert rot.exit_weights(1) == [0.0, 1.0, 0.0]
    grad = EarlyExitConfig(exit_layer_nums=[1, 2, 3], exit_curriculum="gradual", exit_curriculum_iters=30)
    assert grad.active_exits(0) == [False, False, True]
    assert grad.active_exits(10) == [False, True, True]
    assert grad.active_exits(20) == [True, True, True]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(exit_layer_nums=[2, 4], exit_layer_weight=[1.0]),
            r"--exit-layer-weight has 1 values but --exit-layer-nums has 2 exits",
        ),
        (dict(exit_layer_nums=[2], exit_layer_weight_init=[0.0, 0.1]), r"--exit-layer-weight-init has 2 values"),
        (dict(exit_layer_nums=[2], exit_layer_temperature=[1.0, 1.0]), r"--exit-layer-temperature has 2 values"),
        (dict(exit_layer_nums=[2, 2]), r"--exit-layer-nums has duplicate exits: \[2\]"),
        (dict(exit_layer_nums=[3, 2]), r"increasing order"),
        (dict(exit_layer_nums=[0]), r"1-based"),
        (
            dict(exit_layer_nums=[2], use_exit_mlp=True, pre_exit=True),
            r"--use-exit-mlp cannot be combined with --pre-exit",
        ),
        (
            dict(exit_layer_nums=[2], use_exit_mlp=True, use_exit_block=True),
            r"--use-exit-mlp and --use-exit-block cannot be combined",
        ),
        (
            dict(exit_layer_nums=[2], exit_layer_weight_warmup_style="step"),
            r"--exit-layer-weight-warmup-style must be one of",
        ),
        (dict(exit_layer_nums=[2], exit_layer_temperature=[0.0]), r"--exit-layer-temperature must be > 0"),
        (dict(layer_dropout_max=1.5), r"--layer-dropout-max must be in \[0, 1\)"),
        (dict(exit_curriculum="random"), r"--exit-curriculum must be one of"),
        (dict(exit_curriculum="gradual"), r"--exit-curriculum-iters"),
    ],
)
def test_invalid_configs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EarlyExitConfig(**kwargs)


def test_exit_beyond_num_layers(dist1):
    with pytest.raises(ConfigError, match=r"--exit-layer-nums \[5\] outside 1..--num-layers \(4\)"):
        build_ee_gpt(tiny_transformer_config(), EarlyExitConfig(exit_layer_nums=[2, 5]))
