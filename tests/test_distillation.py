"""Exit self-distillation: the KL term, its place in the exit loss, and training with it."""

import pytest
import torch
import torch.nn.functional as F

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.errors import ConfigError
from tests.helpers import build_ee_gpt, ee_loss_and_grads, make_batch, tiny_transformer_config
from tests.training_fixtures import run_training, tiny_run_flags


def _reference_kl(student, teacher, temperature):
    """T^2 KL(softmax(teacher/T) || softmax(student/T)) per position, from torch's kl_div."""
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_and_its_gradient_equal_torch(temperature):
    from megatron.early_exit.distillation import Distillation, distillation_loss, teacher_log_probs

    def loss(student, teacher, temperature):
        return distillation_loss(student, Distillation(teacher_log_probs(teacher, temperature), temperature))

    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 3, 40, generator=g, requires_grad=True)  # [s, b, v]
    teacher = torch.randn(5, 3, 40, generator=g)
    weights = torch.rand(3, 5, generator=g)
    got = loss(student, teacher, temperature)  # [b, s]
    (got * weights).sum().backward()
    grad = student.grad.clone()
    student.grad = None
    expected = _reference_kl(student, teacher, temperature).transpose(0, 1)
    (expected * weights).sum().backward()
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(grad, student.grad, atol=1e-6)
    assert loss(teacher.clone().requires_grad_(), teacher, temperature).abs().max() < 1e-6


def _exit_logits(model, batch):
    tokens, _, pos = batch
    with torch.no_grad():
        out = model(tokens, pos, None)
        return out.exits[0].compute_logits(), out.final.transpose(0, 1)  # [s, b, v] each


def test_exit_loss_mixes_labels_and_final_layer(dist1):
    """a=0.5: the exit's term is 0.5 CE + 0.5 T^2 KL(final || exit); the teacher is detached,
    so the output layer's gradient is that of the final loss alone."""
    kwargs = dict(exit_layer_nums=[2], exit_layer_weight=[1.0], untie_exit_output_weights=True, use_exit_norm=True)
    batch = make_batch()
    plain = EarlyExitConfig(**kwargs)
    distilled = EarlyExitConfig(**kwargs, exit_distill_weight=0.5, exit_distill_temperature=2.0)
    torch.manual_seed(0)
    model = build_ee_gpt(tiny_transformer_config(), distilled, tied=False)
    loss_plain, grads_plain, report_plain = ee_loss_and_grads(model, plain, batch)
    model_plain_out = model(batch[0], batch[2], None, labels=batch[1])
    assert model_plain_out.teacher_logits is not None  # the model's own config asks for it
    loss, grads, report = ee_loss_and_grads(model, distilled, batch)

    exit_logits, final_logits = _exit_logits(model, batch)
    kl = _reference_kl(exit_logits, final_logits, 2.0).mean()
    ce, lm = report.exit_losses[2], report.lm_loss
    assert torch.allclose(report.distill_losses[2], kl, atol=1e-5)
    assert torch.allclose(loss, lm + 0.5 * ce + 0.5 * kl, atol=1e-5)
    assert not torch.allclose(loss, loss_plain, atol=1e-3) and report_plain.distill_losses == {}
    assert torch.equal(grads["output_layer.weight"], grads_plain["output_layer.weight"])
    assert not torch.allclose(grads["exits.2.output_layer.weight"], grads_plain["exits.2.output_layer.weight"])


def test_distill_weight_warms_up():
    config = EarlyExitConfig(exit_layer_nums=[1], exit_distill_weight=0.8, exit_distill_warmup_iters=10)
    assert [config.distill_weight(t) for t in (0, 5, 10, 20)] == pytest.approx([0.0, 0.4, 0.8, 0.8])
    cosine = EarlyExitConfig(
        exit_layer_nums=[1], exit_distill_weight=1.0, exit_distill_warmup_iters=4, exit_distill_warmup_style="cosine"
    )
    assert cosine.distill_weight(2) == pytest.approx(0.5) and cosine.distill_weight(1) < 0.25


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(exit_layer_nums=[1], exit_distill_weight=1.5), "--exit-distill-weight must be in [0, 1]"),
        (
            dict(exit_layer_nums=[1], exit_distill_weight=0.5, exit_distill_temperature=0.0),
            "--exit-distill-temperature",
        ),
        (dict(exit_layer_nums=[1], exit_distill_warmup_iters=-1), "--exit-distill-warmup-iters"),
        (dict(exit_distill_weight=0.5), "--exit-distill-weight needs --exit-layer-nums"),
    ],
)
def test_bad_distillation_settings_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        EarlyExitConfig(**kwargs)


def test_pipeline_stages_without_the_output_layer_are_refused():
    from megatron.early_exit.training.arguments import parse_args

    flags = tiny_run_flags(
        None, **{"--mock-data": None, "--pipeline-model-parallel-size": 2, "--exit-distill-weight": 0.5}
    )
    with pytest.raises(ConfigError, match=r"exits \[1, 2\] are not on the last pipeline stage \(layers 3..4\)"):
        parse_args(flags, world_size=2)
    ok = tiny_run_flags(
        None,
        **{
            "--mock-data": None,
            "--pipeline-model-parallel-size": 2,
            "--exit-distill-weight": 0.5,
            "--exit-layer-nums": "3",
            "--exit-layer-weight": "1",
        },
    )
    assert parse_args(ok, world_size=2).exit_distill_weight == 0.5


@pytest.mark.slow
def test_exit_tuning_with_frozen_backbone_distils(dist1, corpus):
    """EE-Tuning with distillation: the backbone stays as it was, the final layer still runs
    (it is the teacher) and the exits move towards it."""
    from megatron.early_exit.sharding import full_state_dict

    base = tiny_run_flags(corpus, iters=1, **{"--lr": 0.0, "--min-lr": 0.0, "--lr-warmup-iters": 0})
    before = full_state_dict(run_training(base).model.module)
    tuned = run_training(
        tiny_run_flags(
            corpus,
            iters=20,
            **{
                "--tune-exit": None,
                "--untie-exit-output-weights": None,
                "--exit-distill-weight": 1.0,
                "--log-interval": 1,
                "--exit-distill-temperature": 1.0,
            },
        )
    )
    after = full_state_dict(tuned.model.module)
    first, last = tuned.history[0], tuned.history[-1]
    assert "lm loss" in first and "distill loss [1]" in first and "distill loss [2]" in first
    for layer in (1, 2):
        assert last[f"distill loss [{layer}]"] < 0.7 * first[f"distill loss [{layer}]"], (first, last)
    assert abs(last["lm loss"] - first["lm loss"]) < 0.5  # same frozen model, other batches
    for name in before:
        assert torch.equal(before[name], after[name]) != name.startswith("exits."), name
